/*
 * LD_PRELOAD shim that lets Debian's linux.uml (6.1, also 6.12) run on hosts
 * whose XSAVE area is larger than the one UML was compiled for.
 *
 * Why: UML saves and restores each guest task's FPU state with
 * ptrace(PTRACE_GETREGSET / PTRACE_SETREGSET, NT_X86_XSTATE) using a buffer of
 * a size fixed at compile time.  The host kernel accepts a SETREGSET only with
 * the *whole* XSAVE area (11008 bytes on a CPU with AMX, 2696 with AVX-512),
 * so on such hosts every guest process dies at its first return to user space
 * with "userspace - ptrace set fp regs failed, errno = 14" and init panics.
 *
 * What: GETREGSET always fetches the whole area and remembers it, keyed by the
 * address of UML's buffer (one buffer per guest task, inside its pt_regs), then
 * copies the prefix UML asked for.  SETREGSET lays UML's (possibly modified)
 * prefix over the remembered whole area of that task and writes it all.  So
 * every guest task keeps its complete register state, including the parts UML
 * does not know about, across context switches between tasks that share one
 * host process.  Requests whose size already matches pass through untouched,
 * which makes the shim a no-op on hosts where UML works by itself.
 *
 * Known limit: state UML never saves (AVX-512 upper parts) is not put into
 * guest signal frames, as on a host kernel that predates AVX-512.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define MAX_XSTATE (64 * 1024)
#define SLOTS 8192

typedef long (*ptrace_fn)(int, pid_t, void *, void *);
static ptrace_fn real_ptrace;

struct shadow {
	void *key;           /* UML's buffer for one guest task */
	unsigned char *area; /* that task's whole XSAVE area */
};
static struct shadow shadows[SLOTS];
static unsigned char scratch[MAX_XSTATE];

/* Open addressing; UML calls ptrace from one thread only. */
static unsigned char *shadow_of(void *key, int create)
{
	size_t start = ((uintptr_t)key >> 4) % SLOTS;

	for (size_t i = 0; i < SLOTS; i++) {
		struct shadow *s = &shadows[(start + i) % SLOTS];

		if (s->key == key)
			return s->area;
		if (s->key == NULL) {
			if (!create)
				return NULL;
			s->area = malloc(MAX_XSTATE);
			if (s->area == NULL)
				return NULL;
			s->key = key;
			return s->area;
		}
	}
	return NULL;
}

static long get_whole(pid_t pid, unsigned char *area, size_t *size)
{
	struct iovec iov = { area, MAX_XSTATE };
	long r = real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov);

	*size = iov.iov_len;
	return r;
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	pid_t pid;
	void *addr, *data;

	va_start(ap, request);
	pid = va_arg(ap, pid_t);
	addr = va_arg(ap, void *);
	data = va_arg(ap, void *);
	va_end(ap);

	if (real_ptrace == NULL)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	if ((request != PTRACE_GETREGSET && request != PTRACE_SETREGSET) ||
	    (uintptr_t)addr != NT_X86_XSTATE)
		return real_ptrace(request, pid, addr, data);

	struct iovec *iov = data;
	size_t whole;

	if (request == PTRACE_GETREGSET) {
		unsigned char *area = shadow_of(iov->iov_base, 1);

		if (area == NULL)
			area = scratch;
		if (get_whole(pid, area, &whole) < 0)
			return -1;
		if (iov->iov_len > whole)
			iov->iov_len = whole;
		memcpy(iov->iov_base, area, iov->iov_len);
		return 0;
	}

	if (get_whole(pid, scratch, &whole) < 0)
		return -1;
	if (iov->iov_len >= whole)
		return real_ptrace(request, pid, addr, data);

	unsigned char *area = shadow_of(iov->iov_base, 0);

	if (area != NULL)
		memcpy(scratch, area, whole);
	memcpy(scratch, iov->iov_base, iov->iov_len);
	struct iovec all = { scratch, whole };
	return real_ptrace(PTRACE_SETREGSET, pid, addr, &all);
}
