# The PROXY protocol codec (HAProxy's doc/proxy-protocol.txt, v1 text and v2
# binary) as inline C functions that both compiled modules cimport:
# src/bridge.pyx wraps them as parse_proxy_header / build_proxy_header, and the
# engine parses a client's header from its C buffer and builds a backend's from
# the accepted socket's addresses, without the GIL.  fastlb._bridge_py is the
# readable specification; every decision here is the same, in the same order.

from libc.string cimport memchr, memcmp, memcpy, memset

from includes.netinet cimport INET6_ADDRSTRLEN, inet_ntop, inet_pton, sockaddr_in, sockaddr_in6
from includes.socket cimport AF_INET, AF_INET6, sockaddr_storage

cdef enum:
    # The longest header accepted: HAProxy's default buffer size.  A v1 line
    # is at most 107 bytes; a v2 header is 16 bytes plus its length field.
    PROXY_MAX_HEADER = 16384
    # The v1 maximum, CRLF included: "PROXY UNKNOWN" plus two 39-character
    # IPv6 addresses, two 5-digit ports and their spaces.
    PROXY_V1_MAX_LINE = 107
    # Signature, version/command, family/transport, 2-byte big-endian length.
    PROXY_V2_FIXED_LEN = 16
    PROXY_V2_SIGNATURE_LEN = 12
    # What proxy_build may write: the longest v1 line it prints is 104 bytes
    # (TCP6, two 39-character addresses), a v2 IPv6 header 52.
    PROXY_BUILD_MAX = PROXY_V1_MAX_LINE

cdef enum ProxyError:
    # Why proxy_parse returned -1; proxy_error_reason gives the text.
    PROXY_NOT_PROXY = 1
    PROXY_V1_TOO_LONG
    PROXY_V1_MALFORMED
    PROXY_V2_BAD_VERSION
    PROXY_V2_BAD_COMMAND
    PROXY_V2_TOO_LONG
    PROXY_V2_BAD_FAMILY
    PROXY_V2_SHORT_ADDRESS

cdef struct ProxyAddresses:
    int family                  # 0: use the connection's real endpoints; AF_INET or AF_INET6
    unsigned char src[16]       # network order; AF_INET uses the first 4 bytes
    unsigned char dst[16]
    unsigned short src_port     # host order
    unsigned short dst_port


cdef inline const unsigned char* _proxy_v2_signature() noexcept nogil:
    # Chosen so that no text protocol can start with it (a NUL, then "QUIT").
    return <const unsigned char*>b"\r\n\r\n\x00\r\nQUIT\n"


cdef inline Py_ssize_t _proxy_address_len(int family) noexcept nogil:
    return 4 if family == AF_INET else 16


cdef inline bint _proxy_v1_endpoint(int family,
                                    const unsigned char* address, Py_ssize_t address_len,
                                    const unsigned char* port, Py_ssize_t port_len,
                                    unsigned char* packed, unsigned short* port_out) noexcept nogil:
    """Parse one v1 address (inet_pton of the line's family) and its port (1-5 digits, <= 65535)."""
    cdef char text[INET6_ADDRSTRLEN]
    cdef Py_ssize_t i
    cdef unsigned int value = 0
    # No valid address is that long, and a NUL would end the C string early.
    if address_len >= INET6_ADDRSTRLEN or memchr(address, 0, address_len) != NULL:
        return False
    memcpy(text, address, address_len)
    text[address_len] = 0
    if inet_pton(family, text, packed) != 1:
        return False
    if port_len < 1 or port_len > 5:
        return False
    for i in range(port_len):
        if port[i] < 0x30 or port[i] > 0x39:
            return False
        value = value * 10 + (port[i] - 0x30)
    if value > 65535:
        return False
    port_out[0] = <unsigned short>value
    return True


cdef inline Py_ssize_t _proxy_field_end(const unsigned char* data, Py_ssize_t start,
                                        Py_ssize_t end) noexcept nogil:
    """Index of the space ending the field at data[start:end], or end for the last field."""
    cdef const unsigned char* space = <const unsigned char*>memchr(data + start, 0x20, end - start)
    return end if space == NULL else space - data


cdef inline Py_ssize_t _proxy_parse_v1(const unsigned char* data, Py_ssize_t n, ProxyAddresses* out,
                                       int* error) noexcept nogil:
    cdef Py_ssize_t cr, start, k
    cdef Py_ssize_t f[5]
    cdef Py_ssize_t stops[5]
    cdef Py_ssize_t limit = n if n < PROXY_V1_MAX_LINE - 1 else PROXY_V1_MAX_LINE - 1
    cdef const unsigned char* hit = NULL
    # The line ends at its first CR, which must be followed by LF and leave
    # the line within 107 bytes: the CR is at index 105 at the latest.
    if limit > 6:
        hit = <const unsigned char*>memchr(data + 6, 0x0D, limit - 6)
    if hit == NULL:
        if n >= PROXY_V1_MAX_LINE:
            error[0] = PROXY_V1_TOO_LONG
            return -1
        return 0
    cr = hit - data
    if cr + 1 == n:
        return 0
    if data[cr + 1] != 0x0A:
        error[0] = PROXY_V1_MALFORMED
        return -1

    # Split data[6:cr] at single spaces: up to 5 fields, f[k] starts at
    # data[f[k]] and stops before data[stops[k]].
    start = 6
    k = 0
    while True:
        f[k] = start
        stops[k] = _proxy_field_end(data, start, cr)
        if stops[k] == cr or k == 4:
            break
        start = stops[k] + 1
        k += 1

    if stops[0] - f[0] == 7 and memcmp(data + 6, b"UNKNOWN", 7) == 0:
        out.family = 0  # whatever follows UNKNOWN is ignored
        return cr + 2
    if (stops[0] - f[0] != 4 or memcmp(data + 6, b"TCP", 3) != 0
            or (data[9] != 0x34 and data[9] != 0x36)):
        error[0] = PROXY_V1_MALFORMED
        return -1
    out.family = AF_INET if data[9] == 0x34 else AF_INET6
    # Exactly five fields: the fifth runs to the CR, so a sixth would leave a
    # space in it, which no port parses as.
    if (k != 4
            or not _proxy_v1_endpoint(out.family, data + f[1], stops[1] - f[1], data + f[3],
                                      stops[3] - f[3], out.src, &out.src_port)
            or not _proxy_v1_endpoint(out.family, data + f[2], stops[2] - f[2], data + f[4],
                                      cr - f[4], out.dst, &out.dst_port)):
        out.family = 0
        error[0] = PROXY_V1_MALFORMED
        return -1
    return cr + 2


cdef inline Py_ssize_t _proxy_parse_v2(const unsigned char* data, Py_ssize_t n, ProxyAddresses* out,
                                       int* error) noexcept nogil:
    cdef int command, family, transport
    cdef Py_ssize_t length, size, block
    if n < 13:
        return 0
    if data[12] >> 4 != 2:
        error[0] = PROXY_V2_BAD_VERSION
        return -1
    command = data[12] & 0x0F
    if command > 1:  # 0 LOCAL, 1 PROXY
        error[0] = PROXY_V2_BAD_COMMAND
        return -1
    if n < 14:
        return 0
    # LOCAL (a health check from the proxy itself) ignores the family byte
    # and the address block entirely.
    family = data[13] >> 4       # 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX
    transport = data[13] & 0x0F  # 0 UNSPEC, 1 STREAM, 2 DGRAM
    if command == 1 and (family > 3 or transport > 2):
        error[0] = PROXY_V2_BAD_FAMILY
        return -1
    if n < PROXY_V2_FIXED_LEN:
        return 0
    length = PROXY_V2_FIXED_LEN + (data[14] << 8 | data[15])
    if length > PROXY_MAX_HEADER:
        error[0] = PROXY_V2_TOO_LONG
        return -1
    if command == 1:
        block = 0 if family == 0 else 12 if family == 1 else 36 if family == 2 else 216
        if length - PROXY_V2_FIXED_LEN < block:
            error[0] = PROXY_V2_SHORT_ADDRESS
            return -1
    if n < length:
        return 0
    if command == 0 or transport != 1 or family == 0 or family == 3:
        out.family = 0
        return length
    # Source address, destination address, source port, destination port;
    # TLVs after the block are skipped.
    out.family = AF_INET if family == 1 else AF_INET6
    size = _proxy_address_len(out.family)
    data += PROXY_V2_FIXED_LEN
    memcpy(out.src, data, size)
    memcpy(out.dst, data + size, size)
    out.src_port = data[2 * size] << 8 | data[2 * size + 1]
    out.dst_port = data[2 * size + 2] << 8 | data[2 * size + 3]
    return length


cdef inline Py_ssize_t proxy_parse(const unsigned char* data, Py_ssize_t n, ProxyAddresses* out,
                                   int* error) noexcept nogil:
    """Parse the PROXY header at the start of data[:n]: its length, 0 if incomplete, -1 if invalid.

    On success ``out`` holds the announced endpoints (family 0: use the real
    ones); on -1 ``error`` holds a ProxyError.  Only the first 107 bytes are
    read; the rest counts for its length.  fastlb._bridge_py.parse_proxy_header
    over a C buffer.
    """
    cdef const unsigned char* signature
    cdef Py_ssize_t signature_len, known
    out.family = 0
    if n <= 0:
        return 0
    if n > 0 and data[0] == 0x50:  # "P"
        signature = <const unsigned char*>b"PROXY "
        signature_len = 6
    else:
        signature = _proxy_v2_signature()
        signature_len = PROXY_V2_SIGNATURE_LEN
    # Decide at the first byte that differs, so that a client speaking
    # anything else is turned away without waiting for more.
    known = n if n < signature_len else signature_len
    if memcmp(data, signature, known) != 0:
        error[0] = PROXY_NOT_PROXY
        return -1
    if n < signature_len:
        return 0
    if signature_len == 6:
        return _proxy_parse_v1(data, n, out, error)
    return _proxy_parse_v2(data, n, out, error)


cdef inline Py_ssize_t _proxy_put_text(unsigned char* out, const char* text) noexcept nogil:
    cdef Py_ssize_t i = 0
    while text[i]:
        out[i] = text[i]
        i += 1
    return i


cdef inline Py_ssize_t _proxy_put_port(unsigned char* out, unsigned short port) noexcept nogil:
    cdef unsigned char digits[5]
    cdef Py_ssize_t n = 0, i
    while True:
        digits[n] = 0x30 + port % 10
        n += 1
        port //= 10
        if port == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef inline Py_ssize_t proxy_build(unsigned char* out, int version,
                                   const ProxyAddresses* a) noexcept nogil:
    """Write the v1 or v2 header announcing ``a`` into out; its length, -1 for another version.

    ``out`` holds PROXY_BUILD_MAX bytes.  Family 0 gives v1 ``PROXY UNKNOWN``
    or v2 LOCAL.  Addresses are printed with inet_ntop, so v1 text is canonical.
    """
    cdef char text[INET6_ADDRSTRLEN]
    cdef Py_ssize_t size, n
    if version == 1:
        if a.family == 0:
            return _proxy_put_text(out, b"PROXY UNKNOWN\r\n")
        n = _proxy_put_text(out, b"PROXY TCP4 " if a.family == AF_INET else b"PROXY TCP6 ")
        inet_ntop(a.family, a.src, text, INET6_ADDRSTRLEN)
        n += _proxy_put_text(out + n, text)
        out[n] = 0x20
        n += 1
        inet_ntop(a.family, a.dst, text, INET6_ADDRSTRLEN)
        n += _proxy_put_text(out + n, text)
        out[n] = 0x20
        n += 1
        n += _proxy_put_port(out + n, a.src_port)
        out[n] = 0x20
        n += 1
        n += _proxy_put_port(out + n, a.dst_port)
        out[n] = 0x0D
        out[n + 1] = 0x0A
        return n + 2
    if version != 2:
        return -1
    memcpy(out, _proxy_v2_signature(), PROXY_V2_SIGNATURE_LEN)
    if a.family == 0:
        out[12] = 0x20  # version 2, LOCAL
        out[13] = 0x00  # UNSPEC
        out[14] = out[15] = 0
        return PROXY_V2_FIXED_LEN
    size = _proxy_address_len(a.family)
    out[12] = 0x21  # version 2, PROXY
    out[13] = 0x11 if a.family == AF_INET else 0x21  # INET or INET6, STREAM
    out[14] = 0
    out[15] = <unsigned char>(2 * size + 4)
    out += PROXY_V2_FIXED_LEN
    memcpy(out, a.src, size)
    memcpy(out + size, a.dst, size)
    out[2 * size] = a.src_port >> 8
    out[2 * size + 1] = a.src_port & 0xFF
    out[2 * size + 2] = a.dst_port >> 8
    out[2 * size + 3] = a.dst_port & 0xFF
    return PROXY_V2_FIXED_LEN + 2 * size + 4


cdef inline void _proxy_ipv4_mapped(unsigned char* address) noexcept nogil:
    """Turn the 4-byte IPv4 address at the start of address[:16] into ::ffff:a.b.c.d in place."""
    memcpy(address + 12, address, 4)
    memset(address, 0, 10)
    address[10] = address[11] = 0xFF


cdef inline void _proxy_map_mixed(ProxyAddresses* a, int src_family, int dst_family) noexcept nogil:
    """Set a.family from the two families: IPv6 with the IPv4 one mapped when they differ."""
    if src_family == dst_family:
        a.family = src_family
        return
    if src_family == AF_INET:
        _proxy_ipv4_mapped(a.src)
    if dst_family == AF_INET:
        _proxy_ipv4_mapped(a.dst)
    a.family = AF_INET6


cdef inline unsigned short _proxy_net_port(const unsigned char* port) noexcept nogil:
    """A port stored in network order, in host order."""
    return port[0] << 8 | port[1]


cdef inline bint proxy_addresses_from_sockaddrs(ProxyAddresses* out, const sockaddr_storage* src,
                                                const sockaddr_storage* dst) noexcept nogil:
    """Fill ``out`` from a client's peer (src) and local (dst) address; False unless both are IP.

    On False ``out`` has family 0.
    """
    cdef const sockaddr_storage* ends[2]
    cdef unsigned char* addresses[2]
    cdef unsigned short* ports[2]
    cdef int i
    memset(out, 0, sizeof(ProxyAddresses))
    if ((src.ss_family != AF_INET and src.ss_family != AF_INET6)
            or (dst.ss_family != AF_INET and dst.ss_family != AF_INET6)):
        return False
    ends[0], ends[1] = src, dst
    addresses[0], addresses[1] = out.src, out.dst
    ports[0], ports[1] = &out.src_port, &out.dst_port
    for i in range(2):
        if ends[i].ss_family == AF_INET:
            memcpy(addresses[i], &(<const sockaddr_in*>ends[i]).sin_addr, 4)
            ports[i][0] = _proxy_net_port(
                <const unsigned char*>&(<const sockaddr_in*>ends[i]).sin_port)
        else:
            memcpy(addresses[i], &(<const sockaddr_in6*>ends[i]).sin6_addr, 16)
            ports[i][0] = _proxy_net_port(
                <const unsigned char*>&(<const sockaddr_in6*>ends[i]).sin6_port)
    _proxy_map_mixed(out, src.ss_family, dst.ss_family)
    return True


# -- with the GIL: Python values ----------------------------------------------

cdef inline str proxy_error_reason(int error):
    """The ValueError message of a ProxyError, the same as fastlb._bridge_py's."""
    if error == PROXY_NOT_PROXY:
        return "not a PROXY protocol header"
    if error == PROXY_V1_TOO_LONG:
        return "v1 header too long"
    if error == PROXY_V1_MALFORMED:
        return "malformed v1 header"
    if error == PROXY_V2_BAD_VERSION:
        return "v2 bad version"
    if error == PROXY_V2_BAD_COMMAND:
        return "v2 bad command"
    if error == PROXY_V2_TOO_LONG:
        return "v2 header too long"
    if error == PROXY_V2_BAD_FAMILY:
        return "v2 bad address family"
    if error == PROXY_V2_SHORT_ADDRESS:
        return "v2 address block too short"
    return "unknown PROXY header error %d" % error


cdef inline str _proxy_ntop(int family, const unsigned char* address):
    cdef char text[INET6_ADDRSTRLEN]
    inet_ntop(family, address, text, INET6_ADDRSTRLEN)
    return text.decode("ascii")


cdef inline tuple proxy_addresses_tuple(const ProxyAddresses* a):
    """``(source, destination)`` as ``(ip, port)`` tuples, or ``(None, None)`` for family 0."""
    if a.family == 0:
        return None, None
    return ((_proxy_ntop(a.family, a.src), a.src_port),
            (_proxy_ntop(a.family, a.dst), a.dst_port))


cdef inline int _proxy_endpoint_from_tuple(object endpoint, unsigned char* packed,
                                           unsigned short* port) except -1:
    """Parse one ``(ip, port)`` builder argument into packed and port; returns its family."""
    cdef bytes text
    if not isinstance(endpoint, tuple) or len(endpoint) != 2:
        raise TypeError("an endpoint is an (ip, port) tuple")
    ip, number = endpoint
    if not isinstance(ip, str) or not isinstance(number, int):
        raise TypeError("an endpoint is an (ip, port) tuple")
    if not 0 <= number <= 65535:
        raise ValueError("port %r is outside 0-65535" % number)
    port[0] = number
    try:
        text = (<str>ip).encode("ascii")
    except UnicodeEncodeError:
        text = None  # inet_pton accepts ASCII only
    # No valid address is that long, and a NUL would end the C string early.
    if text is not None and len(text) < INET6_ADDRSTRLEN and b"\0" not in text:
        if inet_pton(AF_INET, text, packed) == 1:
            return AF_INET
        if inet_pton(AF_INET6, text, packed) == 1:
            return AF_INET6
    raise ValueError("invalid IP address %r" % ip)


cdef inline int proxy_addresses_from_tuples(ProxyAddresses* out, object source,
                                            object destination) except -1:
    """Fill ``out`` from build_proxy_header's arguments; family 0 when either is None.

    Raises the TypeError or ValueError of fastlb._bridge_py.build_proxy_header
    for a malformed endpoint (both are checked even when one is None).
    """
    cdef int src_family = 0, dst_family = 0
    memset(out, 0, sizeof(ProxyAddresses))
    if source is not None:
        src_family = _proxy_endpoint_from_tuple(source, out.src, &out.src_port)
    if destination is not None:
        dst_family = _proxy_endpoint_from_tuple(destination, out.dst, &out.dst_port)
    if source is None or destination is None:
        memset(out, 0, sizeof(ProxyAddresses))
        return 0
    _proxy_map_mixed(out, src_family, dst_family)
    return 0
