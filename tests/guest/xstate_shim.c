/*
 * LD_PRELOAD shim for user-mode-linux: let a UML whose FP save buffer is shorter than
 * the host's XSAVE area keep running guest tasks on that host. tests/guest/xstate.py builds it,
 * decides whether a host needs it, and reads its report; the "why" is in that module's docstring.
 *
 * The host kernel cuts a longer iovec down to its standard-format area (fpu_user_cfg.max_size
 * bytes) and takes a PTRACE_SETREGSET(NT_X86_XSTATE) only with that whole area: a UML whose
 * buffer is shorter gets EFAULT and kills the task. A buffer at least that long passes through
 * untouched. For a shorter one (UML's "prefix") the shim keeps the whole area per guest task. A
 * guest task is a (host pid, buffer address) pair: UML saves each task's FP state in that task's
 * own thread struct, and runs all tasks of one address space on one host process. A get reads
 * the whole area into the task's history and hands UML the prefix. A set looks in the task's
 * history, newest first, for a state whose prefix is exactly UML's buffer (a task that merely
 * ran, or one returning from a signal handler, whose frame holds the pre-signal prefix) and sets
 * that state with UML's prefix on top. When none matches, the guest kernel gave the task a new
 * state (a new task reusing a dead one's address, exec): it starts from UML's prefix with every
 * component outside the prefix in its initial state, never from another task's.
 *
 * The table is bounded (SLOTS tasks, least recently used evicted; an evicted task starts afresh
 * like a new one, which only loses registers outside the prefix). UML replaces malloc and runs
 * this on small kernel stacks: everything is static or mmap'd, nothing large is on the stack.
 * UML makes these calls from one thread, so there is no locking.
 *
 * Environment (read once, at load): IMAGED_XSTATE_SHIM = "on" (act) or "observe" (pass every
 * call through, only report the lengths); IMAGED_XSTATE_REPORT = a file the shim maps and keeps
 * its counters in (struct report below), readable after UML died; IMAGED_XSTATE_EMULATE = N
 * treats UML's buffers as N bytes long, so that a host whose UML matches it can run the shim's
 * whole path (tests use 832, the x87+SSE+AVX struct _xstate of older UML builds).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define NT_X86_XSTATE 0x202
#define SLOTS 256
#define HISTORY 4
#define MAX_AREA (64 * 1024)
#define HEADER 512 /* offset of the XSAVE header: xstate_bv, then xcomp_bv */
#define REPORT_MAGIC 0x31657461747378ULL /* "xstate1" */

/* The report's layout; tests/guest/xstate.py reads it with the same field order. */
struct report {
    uint64_t magic;
    uint64_t mode; /* 1 observe, 2 on */
    uint64_t host_size;
    uint64_t get_len; /* UML's length in its last get and set */
    uint64_t set_len;
    uint64_t keep_mask; /* components wholly inside UML's prefix */
    uint64_t gets;
    uint64_t sets;
    uint64_t fresh; /* sets that started a task afresh */
    uint64_t older; /* sets that restored a state older than the newest (signal returns) */
    uint64_t evictions;
    uint64_t errors; /* calls the host refused although the shim shaped them */
    uint64_t last_errno;
};

struct slot {
    pid_t pid;
    const void *buf;
    uint64_t used; /* 0: free */
    unsigned head; /* index of the newest state in the history */
    unsigned count;
};

static struct report local_report;
static struct report *rep = &local_report;
static int mode;
static size_t emulate;
static size_t host_size;
static uint64_t clock_;
static struct slot slots[SLOTS];
static unsigned char *areas; /* SLOTS * HISTORY areas of host_size bytes */
static unsigned char scratch[MAX_AREA];

__attribute__((constructor)) static void configure(void)
{
    const char *m = getenv("IMAGED_XSTATE_SHIM");
    const char *e = getenv("IMAGED_XSTATE_EMULATE");
    const char *path = getenv("IMAGED_XSTATE_REPORT");

    mode = m && !strcmp(m, "on") ? 2 : m && !strcmp(m, "observe") ? 1 : 0;
    emulate = e ? strtoul(e, NULL, 10) : 0;
    if (path) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0 && ftruncate(fd, sizeof(struct report)) == 0) {
            void *p = mmap(NULL, sizeof(struct report), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED)
                rep = p;
        }
        if (fd >= 0)
            close(fd);
    }
    memset(rep, 0, sizeof(*rep));
    rep->magic = REPORT_MAGIC;
    rep->mode = (uint64_t)mode;
}

static long raw_ptrace(long request, pid_t pid, void *addr, void *data)
{
    return syscall(SYS_ptrace, request, pid, addr, data);
}

/* Components (XSAVE feature bits) that lie wholly within the first `len` bytes. */
static uint64_t components_within(size_t len)
{
    unsigned a, b, c, d;
    uint64_t mask = len >= HEADER + 64 ? 3 : 0;

    __cpuid_count(0xd, 0, a, b, c, d);
    uint64_t supported = a | (uint64_t)d << 32;
    for (unsigned i = 2; i < 63; i++) {
        if (!(supported >> i & 1))
            continue;
        __cpuid_count(0xd, i, a, b, c, d);
        if (b != 0 && (size_t)a + b <= len) /* a: size, b: offset in the standard format */
            mask |= 1ULL << i;
    }
    return mask;
}

/* The host's area size, asked of the kernel once with a buffer larger than any XSAVE area. */
static int learn_host_size(pid_t pid)
{
    if (host_size)
        return 0;
    struct iovec iov = {scratch, sizeof(scratch)};
    if (raw_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov) < 0)
        return -1;
    host_size = iov.iov_len;
    rep->host_size = host_size;
    return 0;
}

static int ensure_areas(void)
{
    if (areas)
        return 0;
    void *p = mmap(NULL, (size_t)SLOTS * HISTORY * host_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    areas = p;
    return 0;
}

static unsigned char *area(const struct slot *s, unsigned back)
{
    unsigned index = (s->head + HISTORY - back) % HISTORY;
    return areas + ((size_t)(s - slots) * HISTORY + index) * host_size;
}

static struct slot *find(pid_t pid, const void *buf)
{
    for (struct slot *s = slots; s < slots + SLOTS; s++)
        if (s->used && s->pid == pid && s->buf == buf)
            return s;
    return NULL;
}

static struct slot *claim(pid_t pid, const void *buf)
{
    struct slot *victim = slots;
    for (struct slot *s = slots; s < slots + SLOTS; s++) {
        if (!s->used) {
            victim = s;
            break;
        }
        if (s->used < victim->used)
            victim = s;
    }
    if (victim->used)
        rep->evictions++;
    *victim = (struct slot){.pid = pid, .buf = buf, .head = HISTORY - 1};
    return victim;
}

/* Append `state` as the task's newest state. */
static void push(struct slot *s, const unsigned char *state)
{
    s->head = (s->head + 1) % HISTORY;
    if (s->count < HISTORY)
        s->count++;
    memcpy(area(s, 0), state, host_size);
    s->used = ++clock_;
}

static long fail(long result)
{
    int saved = errno;
    rep->errors++;
    rep->last_errno = (uint64_t)saved;
    errno = saved;
    return result;
}

static long get_prefix(pid_t pid, struct iovec *iov, size_t len)
{
    struct iovec whole = {scratch, host_size};
    long r = raw_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
    if (r < 0)
        return r;
    struct slot *s = find(pid, iov->iov_base);
    push(s ? s : claim(pid, iov->iov_base), scratch);
    memcpy(iov->iov_base, scratch, len);
    iov->iov_len = len;
    return r;
}

static long set_prefix(pid_t pid, struct iovec *iov, size_t len)
{
    struct slot *s = find(pid, iov->iov_base);
    const unsigned char *match = NULL;
    for (unsigned back = 0; s && back < s->count && !match; back++) {
        if (!memcmp(area(s, back), iov->iov_base, len)) {
            match = area(s, back);
            rep->older += back > 0;
        }
    }
    if (match) {
        memcpy(scratch, match, host_size);
    } else {
        uint64_t header[2];
        memset(scratch, 0, host_size);
        memcpy(scratch, iov->iov_base, len);
        memcpy(header, scratch + HEADER, sizeof(header));
        header[0] &= rep->keep_mask; /* xstate_bv: the rest starts in its initial state */
        header[1] = 0;               /* xcomp_bv: ptrace takes the standard format */
        memcpy(scratch + HEADER, header, sizeof(header));
        rep->fresh++;
    }
    memcpy(scratch, iov->iov_base, len);
    struct iovec whole = {scratch, host_size};
    long r = raw_ptrace(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &whole);
    if (r < 0)
        return fail(r);
    push(s ? s : claim(pid, iov->iov_base), scratch);
    return r;
}

static long xstate(long request, pid_t pid, struct iovec *iov)
{
    size_t len = emulate && emulate < iov->iov_len ? emulate : iov->iov_len;
    if (request == PTRACE_GETREGSET) {
        rep->gets++;
        rep->get_len = len;
    } else {
        rep->sets++;
        rep->set_len = len;
    }
    if (learn_host_size(pid) < 0)
        return fail(-1);
    if (mode == 1 || len >= host_size)
        return raw_ptrace(request, pid, (void *)NT_X86_XSTATE, iov);
    if (!rep->keep_mask)
        rep->keep_mask = components_within(len);
    if (host_size > MAX_AREA || ensure_areas() < 0) {
        errno = ENOMEM;
        return fail(-1);
    }
    return request == PTRACE_GETREGSET ? get_prefix(pid, iov, len) : set_prefix(pid, iov, len);
}

/* glibc's ptrace(), with its convention for the PEEK requests: the word is the return value. */
long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    if (mode && (long)addr == NT_X86_XSTATE &&
        (request == PTRACE_GETREGSET || request == PTRACE_SETREGSET))
        return xstate(request, pid, data);
    if (request >= PTRACE_PEEKTEXT && request <= PTRACE_PEEKUSER) {
        long word;
        long r = raw_ptrace(request, pid, addr, &word);
        if (r < 0)
            return r;
        errno = 0;
        return word;
    }
    return raw_ptrace(request, pid, addr, data);
}

/* For the host tests: how many tasks the table holds now. */
unsigned imaged_xstate_slots_used(void)
{
    unsigned n = 0;
    for (const struct slot *s = slots; s < slots + SLOTS; s++)
        n += s->used != 0;
    return n;
}

unsigned imaged_xstate_slot_limit(void)
{
    return SLOTS;
}
