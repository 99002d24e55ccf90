# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The adaptive delay policy of delay.h on its own, for tests: every time is passed in (a fake clock).

Thread safety: one thread only (a test's); the channel's own policy is under its consumer_lock.
"""

from libc.stdint cimport int64_t

from delay cimport (
    bc_delay, bc_delay_init, bc_delay_record, bc_delay_fixed_ns, bc_delay_window_ns,
    bc_delay_arrival, bc_delay_decide, bc_delay_target,
)


cdef class DelayPolicy:
    """One channel's max_delay="auto" policy, driven by explicit timestamps (ns)."""

    cdef bc_delay d

    def __cinit__(self, int64_t cap_ns):
        bc_delay_init(&self.d, cap_ns)

    def record(self, int64_t n, int64_t ns) -> None:
        """A batch of n inputs ran in ns."""
        bc_delay_record(&self.d, n, ns)

    def arrival(self, int64_t t_ns) -> None:
        """An input arrived at t_ns and joined the forming batch."""
        bc_delay_arrival(&self.d, t_ns)

    def decide(self, int64_t now_ns, int64_t n, int64_t since_ns) -> int:
        """-1: dispatch the n held now; else the time (ns) to look again."""
        return bc_delay_decide(&self.d, now_ns, n, since_ns)

    def target(self, int64_t max_items) -> int:
        """The batch size at which waiting stops paying."""
        return bc_delay_target(&self.d, max_items)

    @property
    def fixed_ns(self) -> float:
        """The fitted fixed cost a of a batch, ns."""
        return bc_delay_fixed_ns(&self.d)

    @property
    def window_ns(self) -> float:
        """The silence window that ends a wait, ns."""
        return bc_delay_window_ns(&self.d, bc_delay_fixed_ns(&self.d))

    @property
    def gap_ns(self) -> float:
        """The mean short wait for the next arrival, ns (0: none seen)."""
        return self.d.gap_ns

    @property
    def hit(self) -> float:
        """The share of arrivals that came within one fixed cost."""
        return self.d.hit
