# ConnQueue: the one queue type of the engine (included by src/engine.pyx).
#
# An intrusive doubly linked FIFO of Conn structs: the links live in the Conn
# itself, so no queue operation allocates, and append, pop and removal from
# anywhere in the queue are O(1).  A Conn carries one Link per kind of queue
# it can be on at the same time (Conn.links[LINK_*]); each queue threads
# through one of them.  A Link also says which queue holds it, so a
# connection can be taken off "whatever queue it is on" without a search.
#
# Touched only by the thread in Engine.run (or with the GIL once it is over):
# no lock.

cdef struct Conn
cdef struct ConnQueue

cdef enum:
    # Which of Conn.links a queue threads through.  A Conn is on at most one
    # queue per link at a time.
    LINK_LIFE = 0       # fresh (picked up, not yet set up), live or dead
    LINK_PARKED         # parked, waiting for fresher health figures
    LINK_ROUTE          # routes (waiting for the router) or decided (answered)
    LINK_REPORT         # reports (waiting for router.finished)
    N_LINKS


cdef struct Link:
    Conn* prev
    Conn* next
    ConnQueue* queue    # the queue this link is on, NULL when none


cdef struct ConnQueue:
    Conn* head
    Conn* tail
    int link            # LINK_*: the link of Conn.links this queue uses


cdef inline void queue_init(ConnQueue* q, int link) noexcept nogil:
    q.head = q.tail = NULL
    q.link = link


cdef inline bint queue_holds(ConnQueue* q, Conn* c) noexcept nogil:
    return c.links[q.link].queue == q


cdef inline Conn* queue_next(ConnQueue* q, Conn* c) noexcept nogil:
    """The connection after c in q (NULL after the last); c must be on q."""
    return c.links[q.link].next


cdef inline void queue_append(ConnQueue* q, Conn* c) noexcept nogil:
    """Put c at the end of q; c must not be on any queue through q's link."""
    cdef Link* link = &c.links[q.link]
    link.queue = q
    link.prev = q.tail
    link.next = NULL
    if q.tail == NULL:
        q.head = c
    else:
        q.tail.links[q.link].next = c
    q.tail = c


cdef inline void queue_remove(ConnQueue* q, Conn* c) noexcept nogil:
    """Take c off q, wherever it is in it; nothing if q does not hold c."""
    cdef Link* link = &c.links[q.link]
    if link.queue != q:
        return
    if link.prev == NULL:
        q.head = link.next
    else:
        link.prev.links[q.link].next = link.next
    if link.next == NULL:
        q.tail = link.prev
    else:
        link.next.links[q.link].prev = link.prev
    link.prev = link.next = NULL
    link.queue = NULL


cdef inline Conn* queue_pop(ConnQueue* q) noexcept nogil:
    """Take the first connection off q; NULL when q is empty."""
    cdef Conn* c = q.head
    if c != NULL:
        queue_remove(q, c)
    return c


cdef inline void queue_leave(Conn* c, int link) noexcept nogil:
    """Take c off whatever queue it is on through ``link``, if any."""
    if c.links[link].queue != NULL:
        queue_remove(c.links[link].queue, c)
