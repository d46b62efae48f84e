"""Building a candidate in memory: sources held resident, the module sink, compiled and flat
task-vector kernels, zero-copy DFS layer stacks. Bit-equal to what `evomerge merge` writes.

May import: `evomerge.merge` and `evomerge.io`."""
