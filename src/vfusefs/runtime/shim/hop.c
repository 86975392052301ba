/*
 * hop: hand one native call from the trio thread to a worker thread and back, cheaply.
 *
 * Every FUSE request that touches native storage makes one such hop (workers.py explains why
 * the calls cannot run on the trio thread).  With Python's own primitives a hop costs two
 * futex wake-ups, and on a small VM each wake-up of a sleeping CPU costs 15-35 us: more than
 * most native calls.  A Lane is a one-job mailbox between the trio thread and one worker thread
 * in which both sides first spin (GIL released, a bounded time, yielding the CPU to anything
 * else runnable) before they sleep:
 *
 *   trio thread                         worker thread
 *   post_and_wait(job, spin)  ------>   take(spin) / finish_and_take(spin) returns job
 *     spins until DONE                    runs job in Python
 *   <------------------------------     finish_and_take: GIL released first, then DONE
 *
 * The GIL is always released *before* the other side is told to go on, so the side that wakes
 * finds it free and never sleeps on it.  If the poster stops spinning before the job is done,
 * it marks the lane PARKED (a compare-and-swap, so exactly one of "poster parks" and "worker
 * finishes" wins); the worker then gets the PARKED marker back and wakes the poster through
 * trio.  A sleeping worker is woken with a futex; a spinning one sees the job within
 * nanoseconds.
 *
 * States of a lane (the futex word):  IDLE -> POSTED -> DONE -> IDLE   (fast path)
 *                                     IDLE -> POSTED -> PARKED -> IDLE (poster parked)
 *                                     IDLE -> PARKED -> IDLE           (nobody waits)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { IDLE = 0, POSTED = 1, DONE = 2, PARKED = 3 };

typedef struct {
    PyObject_HEAD
    _Atomic int state;
    _Atomic int sleeping;  /* the worker waits on the futex */
    _Atomic int stopping;
    PyObject *job;         /* owned; set by the poster before POSTED/PARKED */
} Lane;

static PyObject *parked_marker;  /* finish_and_take's answer when the poster parked */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wait(_Atomic int *word, int expected)
{
    syscall(SYS_futex, (int *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic int *word)
{
    syscall(SYS_futex, (int *)word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* The one spinning policy: call ready(arg) until it says yes or spin_ns passed, relaxing the
   CPU between calls; every `every` rounds check the clock and give the CPU to anything else
   runnable on it.  Returns 1 if ready.  Call it with the GIL released.  spin_more is the same
   for a caller that has just asked ready itself. */
static int spin_more(int (*ready)(void *), void *arg, uint64_t spin_ns, unsigned every)
{
    if (spin_ns == 0)
        return 0;
    uint64_t deadline = now_ns() + spin_ns;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        if (ready(arg))
            return 1;
        if (i % every == 0) {
            if (now_ns() >= deadline)
                return 0;
            sched_yield();
        }
    }
}

static int spin_until(int (*ready)(void *), void *arg, uint64_t spin_ns, unsigned every)
{
    return ready(arg) || spin_more(ready, arg, spin_ns, every);
}

/* The keeper: a thread that keeps the reading process's CPU awake while the loop spins for the
   pages it asked the device for (pread_cached).  The process sleeps in its read meanwhile, and
   an idle CPU sleeps too (on a VM it halts, and the host deschedules it); waking it for the
   reply then costs 10-25 us, which the process waits on top of the device.  While the keeper
   runs on that CPU, the reply wakes a CPU that is already running, and the process preempts the
   keeper at once: the keeper has SCHED_IDLE, so it never takes time from any other task.

   The keeper is woken when a read misses (its own wake-up overlaps the device's work), moves
   to the CPU the reading thread last ran on (/proc/<tid>/stat, read by the keeper, not the
   loop), and spins there until the loop waits for its next request (poll_fd: the reply has been
   written), or for `until` at most.  It does nothing if that CPU is the loop's own, which is
   busy already, or one it may not run on (the daemon's cpuset).  Off until set_keeper(True). */
static struct {
    _Atomic int on;          /* futex word: 1 while a read waits for the device */
    _Atomic uint64_t until;  /* CLOCK_MONOTONIC ns: spin no longer than this */
    _Atomic int tid;         /* the reading thread */
    _Atomic int loop_cpu;    /* where the loop spins */
    _Atomic unsigned reads;  /* reads that asked for it so far */
    _Atomic int enabled;
    _Atomic int started;     /* the thread runs (in this process: see keeper_forked) */
    pthread_mutex_t start;
} keeper = {.start = PTHREAD_MUTEX_INITIALIZER};

/* The CPU thread tid last ran on (field 39 of /proc/<tid>/stat), or -1. */
static int last_cpu(int tid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');  /* the end of comm, which may hold spaces and parentheses */
    if (p == NULL)
        return -1;
    for (int field = 2; *p; p++) {  /* p is in field 2 (comm); count the separators */
        if (*p == ' ' && ++field == 39)
            return atoi(p + 1);
    }
    return -1;
}

/* Stop spinning for read number `read`, unless another read asked meanwhile (keep_awake
   counts it before it sets `on`, so either it sees `on` cleared and wakes us, or we see it). */
static void keeper_stop(unsigned read)
{
    atomic_store(&keeper.on, 0);
    if (atomic_load(&keeper.reads) != read)
        atomic_store(&keeper.on, 1);
}

static void *keeper_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "vfusefs-keeper");  /* what top -H and tests show */
    struct sched_param idle = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);
    int pinned = -1;
    for (;;) {
        while (!atomic_load(&keeper.on))
            futex_wait(&keeper.on, 0);
        unsigned read = atomic_load(&keeper.reads);
        int cpu = last_cpu(atomic_load(&keeper.tid));
        if (cpu < 0 || cpu >= CPU_SETSIZE || cpu == atomic_load(&keeper.loop_cpu)) {
            keeper_stop(read);
            continue;
        }
        if (cpu != pinned) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpu, &set);
            pinned = sched_setaffinity(0, sizeof(set), &set) == 0 ? cpu : -1;
            if (pinned < 0) {  /* e.g. outside the daemon's cpuset: spinning elsewhere is waste */
                keeper_stop(read);
                continue;
            }
        }
        for (unsigned i = 1; atomic_load_explicit(&keeper.on, memory_order_relaxed); i++) {
            cpu_relax();
            if (i % 64 == 0) {
                if (atomic_load(&keeper.reads) != read)
                    break;  /* another read: look where its thread is */
                if (now_ns() >= atomic_load(&keeper.until))
                    keeper_stop(read);
            }
        }
    }
    return NULL;
}

static void keeper_forked(void)
{
    atomic_store(&keeper.started, 0);  /* the child has no keeper thread */
    atomic_store(&keeper.on, 0);
}

/* Start the thread once per process; 0 if it cannot be (then the keeper stays off). */
static int keeper_start(void)
{
    int ok = 1;
    pthread_mutex_lock(&keeper.start);
    if (!atomic_load(&keeper.started)) {
        static int atfork = 0;
        if (!atfork)
            atfork = pthread_atfork(NULL, NULL, keeper_forked) == 0;
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);  /* Python's signals go to its own threads */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 << 10);
        pthread_t t;
        ok = pthread_create(&t, &attr, keeper_main, NULL) == 0;
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (ok)
            atomic_store(&keeper.started, 1);
        else
            atomic_store(&keeper.enabled, 0);
    }
    pthread_mutex_unlock(&keeper.start);
    return ok;
}

/* A read by thread tid misses the page cache: keep its CPU awake for up to ns. */
static void keep_awake(int tid, uint64_t ns)
{
    if (tid <= 0 || !atomic_load_explicit(&keeper.enabled, memory_order_relaxed))
        return;
    if (!atomic_load(&keeper.started) && !keeper_start())
        return;
    atomic_store(&keeper.loop_cpu, sched_getcpu());
    atomic_store(&keeper.tid, tid);
    atomic_store(&keeper.until, now_ns() + ns);
    atomic_fetch_add(&keeper.reads, 1);
    if (atomic_exchange(&keeper.on, 1) == 0)
        futex_wake(&keeper.on);
}

/* The loop is about to wait for a request: the reply it was spinning for has been written. */
static inline void keeper_off(void)
{
    if (atomic_load_explicit(&keeper.on, memory_order_relaxed)) {
        atomic_store(&keeper.until, 0);
        atomic_store(&keeper.on, 0);
    }
}

static PyObject *hop_set_keeper(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    atomic_store(&keeper.enabled, on);
    if (!on)
        keeper_off();
    Py_RETURN_NONE;
}

static void lane_wake_worker(Lane *self)
{
    if (atomic_load(&self->sleeping))
        futex_wake(&self->state);
}

static inline int has_job(int s)
{
    return s == POSTED || s == PARKED;
}

static int job_or_stop(void *lane)
{
    Lane *self = lane;
    return has_job(atomic_load_explicit(&self->state, memory_order_acquire)) ||
           atomic_load(&self->stopping);
}

static int not_posted(void *lane)
{
    return atomic_load_explicit(&((Lane *)lane)->state, memory_order_acquire) != POSTED;
}

/* Worker side, GIL released: wait until a job is posted (POSTED or PARKED) or the lane stops:
   spin up to spin_ns, then sleep on the futex.  Returns 1 for a job, 0 for stop. */
static int wait_for_job(Lane *self, uint64_t spin_ns)
{
    spin_until(job_or_stop, self, spin_ns, 64);
    for (;;) {
        int s = atomic_load_explicit(&self->state, memory_order_acquire);
        if (has_job(s))
            return 1;
        if (atomic_load(&self->stopping))
            return 0;
        atomic_store(&self->sleeping, 1);
        s = atomic_load(&self->state);
        if (!has_job(s) && !atomic_load(&self->stopping))
            futex_wait(&self->state, s);
        atomic_store(&self->sleeping, 0);
    }
}

/* With the GIL held again after wait_for_job: the posted job, or None once stopped. */
static PyObject *taken(Lane *self, int got)
{
    if (!got || self->job == NULL)
        Py_RETURN_NONE;
    PyObject *job = self->job;
    self->job = NULL;
    return job;  /* the lane's reference passes to the caller */
}

static uint64_t seconds_to_ns(double s)
{
    return s <= 0 ? 0 : (uint64_t)(s * 1e9);
}

static PyObject *lane_take(Lane *self, PyObject *arg)
{
    double spin = PyFloat_AsDouble(arg);
    if (spin == -1.0 && PyErr_Occurred())
        return NULL;
    uint64_t spin_ns = seconds_to_ns(spin);
    int got;
    Py_BEGIN_ALLOW_THREADS
    got = wait_for_job(self, spin_ns);
    Py_END_ALLOW_THREADS
    return taken(self, got);
}

static PyObject *lane_finish_and_take(Lane *self, PyObject *arg)
{
    double spin = PyFloat_AsDouble(arg);
    if (spin == -1.0 && PyErr_Occurred())
        return NULL;
    uint64_t spin_ns = seconds_to_ns(spin);
    int expected = POSTED;
    int published, got = 0;
    /* one GIL-released stretch: the poster, told DONE, must find the GIL free */
    Py_BEGIN_ALLOW_THREADS
    published = atomic_compare_exchange_strong(&self->state, &expected, DONE);
    if (published)
        got = wait_for_job(self, spin_ns);
    Py_END_ALLOW_THREADS
    if (!published) {  /* PARKED: the poster waits in trio; the caller wakes it there */
        atomic_store(&self->state, IDLE);
        Py_INCREF(parked_marker);
        return parked_marker;
    }
    return taken(self, got);
}

static int set_job(Lane *self, PyObject *job)
{
    if (atomic_load(&self->state) != IDLE || self->job != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "hop: lane is busy");
        return -1;
    }
    Py_INCREF(job);
    self->job = job;
    return 0;
}

/* post_and_wait(job, spin) -> True if the job is done, False if the caller must park (the
   worker will answer finish_and_take with PARKED). */
static PyObject *lane_post_and_wait(Lane *self, PyObject *args)
{
    PyObject *job;
    double spin;
    if (!PyArg_ParseTuple(args, "Od", &job, &spin) || set_job(self, job) < 0)
        return NULL;
    uint64_t spin_ns = seconds_to_ns(spin);
    int done;
    Py_BEGIN_ALLOW_THREADS
    atomic_store_explicit(&self->state, POSTED, memory_order_release);
    lane_wake_worker(self);
    spin_until(not_posted, self, spin_ns, 64);
    int expected = POSTED;  /* still POSTED: park; else the worker published DONE */
    done = !atomic_compare_exchange_strong(&self->state, &expected, PARKED);
    if (done)
        atomic_store(&self->state, IDLE);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(done);
}

/* post_parked(job): hand over a job nobody spins for (the worker answers PARKED). */
static PyObject *lane_post_parked(Lane *self, PyObject *job)
{
    if (set_job(self, job) < 0)
        return NULL;
    atomic_store_explicit(&self->state, PARKED, memory_order_release);
    lane_wake_worker(self);
    Py_RETURN_NONE;
}

static PyObject *lane_stop(Lane *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->stopping, 1);
    futex_wake(&self->state);
    Py_RETURN_NONE;
}

static void lane_dealloc(Lane *self)
{
    Py_CLEAR(self->job);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* poll_fd(fd, spin) -> bool: poll fd for input for up to spin seconds, GIL released, yielding
   the CPU to anything else runnable; True once readable.  The FUSE loop calls it before it
   would wait in trio (fuseloop.py): a request that comes within that time finds the loop awake
   (waking a sleeping CPU costs more than most requests). */
static int readable(void *pfd)
{
    return poll(pfd, 1, 0) > 0;
}

static PyObject *hop_poll_fd(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    double spin;
    if (!PyArg_ParseTuple(args, "id", &fd, &spin))
        return NULL;
    uint64_t spin_ns = seconds_to_ns(spin);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int ready;
    keeper_off();
    Py_BEGIN_ALLOW_THREADS
    ready = spin_until(readable, &p, spin_ns, 16);  /* each round is a syscall already */
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ready);
}

/* pread_cached(fd, size, off, spin, tid=0) -> (data, whole): read what the page cache holds,
   never waiting for storage.  Each attempt is a preadv2(RWF_NOWAIT), which copies cached pages
   or fails with EAGAIN at once; on a miss the kernel has started reading the pages in (the
   readahead a plain pread would start), so later attempts find them once the device is done.
   Attempts go on, spinning up to spin seconds with the GIL released, until size bytes or end
   of file are read (whole is True), or the spin is over: data is then what came so far, and
   a worker's pread waits for the rest, which is already on its way.  While it spins, the
   keeper keeps the CPU of thread tid (the process reading) awake.  OSError for any other
   error (EOPNOTSUPP: the filesystem does not promise not to wait).  Only for fds without
   O_DIRECT: a direct read waits for the device even with RWF_NOWAIT. */
struct cached_read {
    int fd;
    char *buf;
    size_t size;
    off_t off;
    size_t got;
    int err;
};

static int read_more(void *arg)
{
    struct cached_read *r = arg;
    while (r->got < r->size) {
        struct iovec iov = {.iov_base = r->buf + r->got, .iov_len = r->size - r->got};
        ssize_t n = preadv2(r->fd, &iov, 1, r->off + (off_t)r->got, RWF_NOWAIT);
        if (n > 0) {
            r->got += (size_t)n;
            continue;
        }
        if (n == 0)
            return 1;  /* end of file */
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN) {
            r->err = errno;
            return 1;
        }
        return 0;  /* not (all) in the page cache yet */
    }
    return 1;
}

/* how long the keeper may go on after the spin, for the reply to be written (poll_fd stops it) */
#define KEEP_AFTER_NS 200000

static PyObject *hop_pread_cached(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd;
    Py_ssize_t size;
    long long off;
    double spin;
    int tid = 0;
    if (!PyArg_ParseTuple(args, "inLd|i", &fd, &size, &off, &spin, &tid))
        return NULL;
    if (size < 0 || off < 0) {
        PyErr_SetString(PyExc_ValueError, "pread_cached: negative size or offset");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL)
        return NULL;
    struct cached_read r = {.fd = fd, .buf = PyBytes_AS_STRING(data), .size = (size_t)size,
                            .off = (off_t)off};
    uint64_t spin_ns = seconds_to_ns(spin);
    int done;
    Py_BEGIN_ALLOW_THREADS
    done = read_more(&r);
    if (!done && spin_ns) {  /* a miss: the pages are on their way */
        keep_awake(tid, spin_ns + KEEP_AFTER_NS);
        done = spin_more(read_more, &r, spin_ns, 8);  /* each round is a syscall already */
    }
    Py_END_ALLOW_THREADS
    if (r.err) {
        Py_DECREF(data);
        errno = r.err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (r.got < r.size && _PyBytes_Resize(&data, (Py_ssize_t)r.got) < 0)
        return NULL;
    return Py_BuildValue("(NO)", data, done ? Py_True : Py_False);
}

/* close_fds(fds) -> None: close every fd in the list, the GIL released once for all of them.
   Background closes run on a worker while the trio thread serves requests; os.close in a loop
   would take the GIL back after each fd and make the trio thread wait for it each time.
   Errors are ignored: these are our own fds, and close(2) releases the fd even when it fails. */
static PyObject *hop_close_fds(PyObject *Py_UNUSED(module), PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "close_fds: expected a list of fds");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int *fds = PyMem_New(int, n > 0 ? n : 1);
    if (fds == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        if (fd < 0 || fd > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "close_fds: %ld is not an fd", fd);
            goto fail;
        }
        fds[i] = (int)fd;
    }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        close(fds[i]);
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    Py_RETURN_NONE;
fail:  /* nothing closed */
    PyMem_Free(fds);
    Py_DECREF(seq);
    return NULL;
}

/* listxattr_at(dirfd, name) -> bytes or None: the NUL-terminated xattr names of name in dirfd
   (name itself, never a symlink's target), with listxattrat(2) (Linux 6.13).  Without it,
   llistxattr on "/proc/self/fd/<dirfd>/<name>" says the same but costs twice as much (the walk
   through /proc); None tells the caller to do that. */
#ifndef __NR_listxattrat
#define __NR_listxattrat 465  /* the same on every architecture (asm-generic and x86_64) */
#endif
static int have_listxattrat = 1;

static PyObject *hop_listxattr_at(PyObject *Py_UNUSED(module), PyObject *args)
{
    int dirfd;
    const char *name;
    if (!PyArg_ParseTuple(args, "iy", &dirfd, &name))
        return NULL;
    if (!have_listxattrat)
        Py_RETURN_NONE;
    const unsigned int flags = AT_SYMLINK_NOFOLLOW;
    char small[1024];
    char *buf = small;
    size_t size = sizeof(small);
    long n;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        n = syscall(__NR_listxattrat, dirfd, name, flags, buf, size);
        Py_END_ALLOW_THREADS
        if (n >= 0 || errno != ERANGE)
            break;
        /* grew since we asked, or longer than small: ask for the size, then read again */
        long want;
        Py_BEGIN_ALLOW_THREADS
        want = syscall(__NR_listxattrat, dirfd, name, flags, NULL, (size_t)0);
        Py_END_ALLOW_THREADS
        if (want < 0) {
            n = want;
            break;
        }
        if (buf != small)
            PyMem_Free(buf);
        size = (size_t)want + 256;
        buf = PyMem_Malloc(size);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    PyObject *result;
    if (n >= 0) {
        result = PyBytes_FromStringAndSize(buf, n);
    } else if (errno == ENOSYS) {
        have_listxattrat = 0;
        result = Py_NewRef(Py_None);
    } else {
        result = PyErr_SetFromErrno(PyExc_OSError);
    }
    if (buf != small)
        PyMem_Free(buf);
    return result;
}

static PyMethodDef module_methods[] = {
    {"listxattr_at", hop_listxattr_at, METH_VARARGS,
     "listxattr_at(dirfd, name) -> bytes or None: NUL-terminated xattr names of name (never "
     "followed) in dirfd; None without listxattrat(2)"},
    {"poll_fd", hop_poll_fd, METH_VARARGS,
     "poll_fd(fd, spin) -> bool: wait up to spin seconds (spinning) for fd to be readable"},
    {"pread_cached", hop_pread_cached, METH_VARARGS,
     "pread_cached(fd, size, off, spin, tid=0) -> (data, whole): what the page cache holds, "
     "spinning up to spin seconds for pages being read in (keeping tid's CPU awake meanwhile); "
     "never waits for storage"},
    {"set_keeper", hop_set_keeper, METH_O,
     "set_keeper(on): whether pread_cached keeps the reading thread's CPU awake while it spins"},
    {"close_fds", hop_close_fds, METH_O,
     "close_fds(fds) -> None: close every fd in the list, the GIL released once"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef lane_methods[] = {
    {"post_and_wait", (PyCFunction)lane_post_and_wait, METH_VARARGS,
     "post_and_wait(job, spin) -> bool: hand job to the worker, spin up to spin seconds for it; "
     "False: not done, the worker will report PARKED"},
    {"post_parked", (PyCFunction)lane_post_parked, METH_O,
     "post_parked(job): hand job to the worker with nobody spinning for it"},
    {"take", (PyCFunction)lane_take, METH_O,
     "take(spin) -> job or None (stopped): the worker's wait for its first job"},
    {"finish_and_take", (PyCFunction)lane_finish_and_take, METH_O,
     "finish_and_take(spin) -> next job, None (stopped) or PARKED (wake the poster, then take)"},
    {"stop", (PyCFunction)lane_stop, METH_NOARGS, "stop(): the worker returns None once idle"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfusefs._hop.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_methods = lane_methods,
    .tp_doc = "A one-job mailbox between the trio thread and one worker thread.",
};

static struct PyModuleDef hop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vfusefs._hop",
    .m_doc = "Cheap hand-offs between the trio thread and workers.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__hop(void)
{
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hop_module);
    if (m == NULL)
        return NULL;
    parked_marker = PyUnicode_InternFromString("PARKED");
    if (parked_marker == NULL || PyModule_AddObjectRef(m, "PARKED", parked_marker) < 0 ||
        PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
