# C declarations of the POSIX and Linux headers the compiled twins use that
# Cython does not ship in its own posix.* and libc.* (those are cimported from
# there): one file per header or group of Linux extensions, cimported as
# includes.<name>, so that none is mistaken for one of Cython's.
