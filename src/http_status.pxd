# The HTTP/1.x status-line check, as an inline C function that both compiled
# modules cimport (src/bridge.pyx and src/engine.pyx): one definition.

cdef enum:
    # "HTTP/1.x NNN" plus the character after the code.
    STATUS_PREFIX_LEN = 13


cdef inline bint _is_digit(unsigned char c) noexcept nogil:
    return 0x30 <= c <= 0x39


cdef inline int status_code(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """The status code at the start of data, 0 if more bytes are needed, -1 if malformed.

    fastlb._bridge_py.parse_status_line over a C buffer: ``HTTP/1.<digit>
    <three digits>`` then a space, CR or LF; the code must be at least 100.
    """
    cdef const char* prefix = b"HTTP/1."
    cdef Py_ssize_t i
    cdef int code
    for i in range(n if n < 7 else 7):
        if data[i] != <unsigned char>prefix[i]:
            return -1
    if n < 8:
        return 0
    if not _is_digit(data[7]):
        return -1
    if n < 9:
        return 0
    if data[8] != 0x20:
        return -1
    for i in range(9, 12):
        if i >= n:
            return 0
        if not _is_digit(data[i]):
            return -1
    if n < 13:
        return 0
    if data[12] != 0x20 and data[12] != 0x0D and data[12] != 0x0A:
        return -1
    code = (data[9] - 0x30) * 100 + (data[10] - 0x30) * 10 + (data[11] - 0x30)
    return code if code >= 100 else -1
