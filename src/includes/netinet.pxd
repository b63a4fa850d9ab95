# Declarations from <netinet/in.h>, <netinet/tcp.h> and <arpa/inet.h> used by
# src/engine.pyx: IPv4/IPv6 socket addresses built from a numeric address, and
# turned back into one for accepted clients; and by src/proxy_header.pxd, which
# reads and prints the addresses of PROXY protocol headers.

from libc.stdint cimport uint16_t, uint32_t

from includes.socket cimport sa_family_t, socklen_t

cdef extern from "netinet/in.h" nogil:
    ctypedef uint16_t in_port_t

    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        in_port_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        in_port_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    enum:
        IPPROTO_TCP

    uint16_t htons(uint16_t value)
    uint16_t ntohs(uint16_t value)
    uint32_t ntohl(uint32_t value)

cdef extern from "netinet/tcp.h" nogil:
    enum:
        TCP_NODELAY

cdef extern from "arpa/inet.h" nogil:
    enum:
        INET6_ADDRSTRLEN

    int inet_pton(int family, const char* text, void* address)
    const char* inet_ntop(int family, const void* address, char* text, socklen_t size)
