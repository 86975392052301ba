/*
 * fuseshim: what pyfuse3 does not tell vfusefs, and one flag it cannot set.
 *
 * The kernel sends FUSE_STATFS with the inode of the path df asked about, and libfuse passes
 * it to the filesystem's statfs(req, ino) callback, but pyfuse3 drops it before calling
 * Operations.statfs(ctx).  Without it every df shows the same numbers; with it, df inside a
 * vfolder shows that vfolder's quota.
 *
 * This library is loaded with RTLD_GLOBAL before pyfuse3, so pyfuse3's call to
 * fuse_session_new() binds here.  We pass on a copy of its operations table in which statfs
 * first stores the inode in vfusefs_statfs_ino and then calls pyfuse3's own handler.  pyfuse3
 * handles every request on one thread and vfusefs reads the variable before its handler's
 * first await, so no other request can overwrite it in between.
 *
 * read is wrapped the same way to store the thread id of the process reading in
 * vfusefs_read_tid: while a read waits for the device, vfusefs keeps that thread's CPU awake
 * (the keeper in shim/hop.c).
 *
 * write_buf is wrapped to store whether a write is the kernel writing back pages of its cache
 * (fi->writepage: a shared writable mapping, or the write-back cache) in
 * vfusefs_write_cached: such a write carries whichever writable handle the kernel picked, not
 * necessarily the one of whoever dirtied the pages (ops.write decides with it).
 *
 * It also wraps fuse_reply_open() (pyfuse3 binds it here the same way) to set FOPEN_NOFLUSH on
 * files opened read-only: the kernel then does not send a FLUSH request when such a file is
 * closed.  vfusefs has nothing to do on those (flush pushes a handle's writes; posix locks are
 * the kernel's, vfusefs implements none), and one request fewer per read-only open is about a
 * fifth of what reading a small file costs.
 *
 * What it must never do: change any other operation, or anything about statfs, read and
 * write_buf but recording, or anything about an open reply but noflush on read-only opens.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <fuse_lowlevel.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <string.h>

volatile unsigned long long vfusefs_statfs_ino = 0;
volatile int vfusefs_statfs_hooked = 0;
volatile int vfusefs_read_tid = 0;
volatile int vfusefs_write_cached = 0;

typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static void (*pyfuse3_statfs)(fuse_req_t req, fuse_ino_t ino);
static read_fn pyfuse3_read;
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                             struct fuse_file_info *);
static write_buf_fn pyfuse3_write_buf;
static struct fuse_lowlevel_ops ops_copy;

/* libfuse's own definition of a function we wrap, asked for by name (RTLD_NEXT cannot see it
   from a library loaded with dlopen); NULL if libfuse3 cannot be found. */
static void *libfuse_symbol(const char *name, void *wrapper)
{
    static void *libfuse = NULL;
    if (libfuse == NULL)
        libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
    if (libfuse == NULL)
        return NULL;
    void *real = dlvsym(libfuse, name, "FUSE_3.0");
    if (real == NULL)
        real = dlsym(libfuse, name);
    return real == wrapper ? NULL : real;
}

static void record_statfs(fuse_req_t req, fuse_ino_t ino)
{
    vfusefs_statfs_ino = ino;
    pyfuse3_statfs(req, ino);
}

static void record_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                        struct fuse_file_info *fi)
{
    vfusefs_read_tid = (int)fuse_req_ctx(req)->pid;
    pyfuse3_read(req, ino, size, off, fi);
}

static void record_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                             struct fuse_file_info *fi)
{
    vfusefs_write_cached = fi != NULL && fi->writepage;
    pyfuse3_write_buf(req, ino, bufv, off, fi);
}

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    session_new_fn real = (session_new_fn)libfuse_symbol("fuse_session_new",
                                                         (void *)fuse_session_new);
    if (real == NULL)
        return NULL;
    if (op == NULL || op_size > sizeof(ops_copy) || op->statfs == NULL)
        return real(args, op, op_size, userdata);
    memset(&ops_copy, 0, sizeof(ops_copy));
    memcpy(&ops_copy, op, op_size);
    pyfuse3_statfs = op->statfs;
    ops_copy.statfs = record_statfs;
    if (op->read != NULL) {
        pyfuse3_read = op->read;
        ops_copy.read = record_read;
    }
    if (op->write_buf != NULL) {
        pyfuse3_write_buf = op->write_buf;
        ops_copy.write_buf = record_write_buf;
    }
    vfusefs_statfs_hooked = 1;
    return real(args, &ops_copy, op_size, userdata);
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static reply_open_fn real = NULL;
    if (real == NULL) {
        real = (reply_open_fn)libfuse_symbol("fuse_reply_open", (void *)fuse_reply_open);
        if (real == NULL)
            return -38; /* -ENOSYS: cannot happen with libfuse3 installed */
    }
    if (fi != NULL && (fi->flags & O_ACCMODE) == O_RDONLY) {
        struct fuse_file_info copy = *fi;
        copy.noflush = 1;
        return real(req, &copy);
    }
    return real(req, fi);
}
