# Declarations from <sys/socket.h> used by the compiled twins (src/*.pyx); Cython ships none.

cdef extern from "sys/socket.h" nogil:
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL
        SHUT_WR

    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int shutdown(int fd, int how)

# Used by src/engine.pyx: creating and connecting backend sockets itself, with
# an address built in C (no getaddrinfo on the connection path).

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned short sa_family_t
    ctypedef unsigned int socklen_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    enum:
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR
        MSG_PEEK

    int socket(int domain, int type, int protocol)
    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    int connect(int fd, const sockaddr* addr, socklen_t addrlen)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t length)
    int getpeername(int fd, sockaddr* addr, socklen_t* addrlen)
    int getsockname(int fd, sockaddr* addr, socklen_t* addrlen)
