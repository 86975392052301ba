/*
 * statfs_ino: tell vfusefs which inode a statfs request is about.
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
 * It also wraps fuse_reply_open() (pyfuse3 binds it here the same way) to set FOPEN_NOFLUSH on
 * files opened read-only: the kernel then does not send a FLUSH request when such a file is
 * closed.  vfusefs has nothing to do on those (flush pushes a handle's writes; posix locks are
 * the kernel's, vfusefs implements none), and one request fewer per read-only open is about a
 * fifth of what reading a small file costs.
 *
 * What it must never do: change any other operation, or anything about statfs but recording,
 * or anything about an open reply but noflush on read-only opens.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <fuse_lowlevel.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <string.h>

volatile unsigned long long vfusefs_statfs_ino = 0;
volatile int vfusefs_statfs_hooked = 0;
volatile int vfusefs_noflush = 1;  /* vfusefs may turn it off before mounting */
volatile unsigned long long vfusefs_noflush_opens = 0;  /* read-only opens answered noflush */

static void (*pyfuse3_statfs)(fuse_req_t req, fuse_ino_t ino);
static struct fuse_lowlevel_ops ops_copy;

static void record_statfs(fuse_req_t req, fuse_ino_t ino)
{
    vfusefs_statfs_ino = ino;
    pyfuse3_statfs(req, ino);
}

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    /* libfuse's own definition, asked for by name: RTLD_NEXT cannot see it from a library
       loaded with dlopen */
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
    session_new_fn real = NULL;
    if (libfuse != NULL) {
        real = (session_new_fn)dlvsym(libfuse, "fuse_session_new", "FUSE_3.0");
        if (real == NULL)
            real = (session_new_fn)dlsym(libfuse, "fuse_session_new");
    }
    if (real == NULL || real == fuse_session_new)
        return NULL;
    if (op == NULL || op_size > sizeof(ops_copy) || op->statfs == NULL)
        return real(args, op, op_size, userdata);
    memset(&ops_copy, 0, sizeof(ops_copy));
    memcpy(&ops_copy, op, op_size);
    pyfuse3_statfs = op->statfs;
    ops_copy.statfs = record_statfs;
    vfusefs_statfs_hooked = 1;
    return real(args, &ops_copy, op_size, userdata);
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);

static void *libfuse_handle(void)
{
    static void *handle = NULL;
    if (handle == NULL)
        handle = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
    return handle;
}

int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static reply_open_fn real = NULL;
    if (real == NULL) {
        void *libfuse = libfuse_handle();
        if (libfuse != NULL) {
            real = (reply_open_fn)dlvsym(libfuse, "fuse_reply_open", "FUSE_3.0");
            if (real == NULL)
                real = (reply_open_fn)dlsym(libfuse, "fuse_reply_open");
        }
        if (real == NULL || real == fuse_reply_open)
            return -38; /* -ENOSYS: cannot happen with libfuse3 installed */
    }
    if (fi != NULL && vfusefs_noflush && (fi->flags & O_ACCMODE) == O_RDONLY) {
        struct fuse_file_info copy = *fi;
        copy.noflush = 1;
        vfusefs_noflush_opens++;
        return real(req, &copy);
    }
    return real(req, fi);
}
