"""How work is run: per-host worker lanes and admin pools for blocking calls (`workers`), the
FUSE session loop's fast wait (`fuseloop`), and the two C pieces in `shim/` (`hop.c`: the
trio-to-worker hand-off, as `_hop`; `fuseshim.c`: what libfuse knows and pyfuse3 does not pass
on, loaded by `fuseshim`).  Nothing here knows about vfolders, grants or quota."""
