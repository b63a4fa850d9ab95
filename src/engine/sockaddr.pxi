# Socket addresses between C and Python, and accept_batch, the accept loop's
# half of the hand-off to the engines (included by src/engine.pyx).

import socket as _socket

from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, errno
from libc.string cimport memset, strerror

from includes.netinet cimport (INET6_ADDRSTRLEN, htons, inet_ntop, inet_pton, ntohl, ntohs,
                               sockaddr_in, sockaddr_in6)
from includes.poll cimport POLLIN, poll, pollfd
from includes.socket cimport (AF_INET, AF_INET6, SOCK_CLOEXEC, SOCK_NONBLOCK, accept4, sockaddr,
                              sockaddr_storage, socklen_t)


cdef enum:
    # Most clients accept_batch takes per call (and so per GIL acquisition).
    C_ACCEPT_BATCH = 64

ACCEPT_BATCH = C_ACCEPT_BATCH


def accept_batch(listener, waker, int limit=C_ACCEPT_BATCH):
    """Wait for clients on ``listener`` and accept up to ``limit`` of them, without the GIL.

    Returns ``[(client, addr), ...]``: ``client`` is a non-blocking,
    close-on-exec descriptor for ``Engine.add`` (the caller owns it until
    then), ``addr`` the peer as ``socket.accept`` gives it.  Returns an empty
    list as soon as ``waker`` is readable (it is not read: the caller decides
    what a wake-up means), and when a signal interrupted the wait, so that the
    caller's signal handlers run.  An accept error other than "try again" is
    raised as OSError, unless clients were accepted before it: those are
    returned, and the error comes again on the next call.
    """
    cdef int lfd = listener.fileno()
    cdef int wfd = waker.fileno()
    cdef pollfd fds[2]
    cdef int fd_list[C_ACCEPT_BATCH]
    cdef sockaddr_storage addrs[C_ACCEPT_BATCH]
    cdef socklen_t length
    cdef int n = 0, k, err = 0
    if limit > C_ACCEPT_BATCH:
        limit = C_ACCEPT_BATCH
    fds[0].fd = lfd
    fds[0].events = POLLIN
    fds[1].fd = wfd
    fds[1].events = POLLIN
    with nogil:
        k = poll(fds, 2, -1)
        if k < 0:
            err = errno
        elif not fds[1].revents:
            while n < limit:
                length = sizeof(sockaddr_storage)
                k = accept4(lfd, <sockaddr*>&addrs[n], &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
                if k >= 0:
                    fd_list[n] = k
                    n += 1
                    continue
                err = errno
                if err == ECONNABORTED:   # the client gave up in the backlog: next one
                    err = 0
                    continue
                if err == EAGAIN or err == EINTR:
                    err = 0
                break
    if err and err != EINTR and n == 0:
        raise OSError(err, strerror(err).decode())
    return [(fd_list[k], _sockaddr_tuple(&addrs[k])) for k in range(n)]


cdef object _sockaddr_tuple(sockaddr_storage* addr):
    """The peer address as Python's socket gives it: (ip, port[, flowinfo, scope_id])."""
    cdef char text[INET6_ADDRSTRLEN]
    cdef sockaddr_in* sin = <sockaddr_in*>addr
    cdef sockaddr_in6* sin6 = <sockaddr_in6*>addr
    if addr.ss_family == AF_INET:
        inet_ntop(AF_INET, &sin.sin_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(sin.sin_port))
    if addr.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &sin6.sin6_addr, text, sizeof(text))
        return (text.decode("ascii"), ntohs(sin6.sin6_port), ntohl(sin6.sin6_flowinfo),
                sin6.sin6_scope_id)
    return None


cdef object _fill_sockaddr(sockaddr_storage* peer, socklen_t* length, family, ip, port):
    """With the GIL: the sockaddr for (family, ip, port) in peer; None, or why it cannot be.

    Runs per routed connection: a numeric address (what fastlb resolves
    backends to at start-up) is parsed once, straight into ``peer``.
    """
    cdef sockaddr_in* sin = <sockaddr_in*>peer
    cdef sockaddr_in6* sin6 = <sockaddr_in6*>peer
    cdef int fam = family
    host = ip.encode("ascii", "replace") if isinstance(ip, str) else bytes(ip)
    memset(peer, 0, sizeof(sockaddr_storage))
    if not _put_address(peer, fam, host):
        # Not a plain numeric address (a scoped IPv6 "fe80::1%eth0", or a name
        # that was never resolved): what socket.connect would do, once.
        try:
            infos = _socket.getaddrinfo(ip, port, fam, _socket.SOCK_STREAM)
        except OSError as exc:
            return "connect failed: %s" % (exc.strerror or exc)
        fam, _, _, _, address = infos[0]
        memset(peer, 0, sizeof(sockaddr_storage))
        if not _put_address(peer, fam, address[0].split("%")[0].encode("ascii")):
            return "connect failed: unsupported address %r" % (address,)
        if fam == AF_INET6:
            sin6.sin6_scope_id = address[3]
    if fam == AF_INET:
        sin.sin_port = htons(<unsigned short>port)
        length[0] = sizeof(sockaddr_in)
    else:
        sin6.sin6_port = htons(<unsigned short>port)
        length[0] = sizeof(sockaddr_in6)
    return None


cdef bint _put_address(sockaddr_storage* peer, int family, bytes host):
    """Parse the numeric address ``host`` of ``family`` into peer; False if it is not one."""
    if family == AF_INET and inet_pton(AF_INET, host, &(<sockaddr_in*>peer).sin_addr) == 1:
        (<sockaddr_in*>peer).sin_family = AF_INET
        return True
    if family == AF_INET6 and inet_pton(AF_INET6, host, &(<sockaddr_in6*>peer).sin6_addr) == 1:
        (<sockaddr_in6*>peer).sin6_family = AF_INET6
        return True
    return False
