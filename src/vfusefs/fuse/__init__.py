"""The FUSE side: every request handler (`ops`), the inode table (`inodes`), the fd budget that
keeps it within RLIMIT_NOFILE (`fdbudget`), the one place that makes the kernel forget
(`kernel`), who the caller is (`callers`), and the one place exceptions become errno
(`errors`).  It decides and charges through `domain`, does I/O through `native` on `runtime`
workers, and never talks to the store or a backend itself (that is `state`'s)."""
