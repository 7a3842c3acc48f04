/*
 * vCPU throttling, for migrations that do not converge (auto-converge).
 *
 * A throttle of P % takes that share of each vCPU's time away: every
 * THROTTLE_SLICE_NS of guest run time the vCPU thread sleeps
 * P / (100 - P) slices.  Each vCPU thread paces itself: while throttled it
 * keeps a POSIX timer that sends it the kick signal once a slice, so
 * KVM_RUN returns even to a guest that never exits, and at each return it
 * sleeps if its slice is over.  No extra thread, and nothing at all while
 * the throttle is 0.
 *
 * The sleep is a timed wait on vm->cond: pause and stop broadcast it, so a
 * throttled vCPU still pauses at once (the switchover waits for that).
 */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "vmm-internal.h"

#define THROTTLE_SLICE_NS 10000000ull   /* 10 ms, as QEMU's cpu-throttle */

int vmig_vm_set_throttle(struct vmig_vm *vm, unsigned int pct)
{
	unsigned int i;

	if (pct > VMIG_VM_MAX_THROTTLE)
		return -EINVAL;
	atomic_store(&vm->throttle_pct, pct);
	/* A guest that never exits stays in KVM_RUN: kick each vCPU thread
	 * once so it sees the new value (and arms or drops its timer). */
	pthread_mutex_lock(&vm->lock);
	for (i = 0; i < vm->cfg.nr_vcpus; i++)
		vmig__vcpu_kick(&vm->vcpus[i]);
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

unsigned int vmig_vm_throttle(const struct vmig_vm *vm)
{
	return atomic_load(&((struct vmig_vm *)vm)->throttle_pct);
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void timer_arm(struct vmig__vcpu *vcpu)
{
	struct sigevent sev;
	struct itimerspec its = {
		.it_interval = { 0, (long)THROTTLE_SLICE_NS },
		.it_value = { 0, (long)THROTTLE_SLICE_NS },
	};

	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = VMIG__SIGKICK;
	sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
	if (timer_create(CLOCK_MONOTONIC, &sev, &vcpu->throttle_timer) < 0)
		return;          /* unthrottled, but the guest still runs */
	if (timer_settime(vcpu->throttle_timer, 0, &its, NULL) < 0) {
		timer_delete(vcpu->throttle_timer);
		return;
	}
	vcpu->throttle_armed = true;
	vcpu->throttle_next_ns = mono_ns() + THROTTLE_SLICE_NS;
}

void vmig__vcpu_throttle_fini(struct vmig__vcpu *vcpu)
{
	if (vcpu->throttle_armed)
		timer_delete(vcpu->throttle_timer);
	vcpu->throttle_armed = false;
}

void vmig__vcpu_throttle_point(struct vmig__vcpu *vcpu)
{
	struct vmig_vm *vm = vcpu->vm;
	unsigned int pct = atomic_load_explicit(&vm->throttle_pct, memory_order_relaxed);
	uint64_t now, sleep_ns;
	struct timespec until;

	if (!pct) {
		vmig__vcpu_throttle_fini(vcpu);
		return;
	}
	if (!vcpu->throttle_armed) {
		timer_arm(vcpu);
		return;
	}
	now = mono_ns();
	if (now < vcpu->throttle_next_ns)
		return;
	sleep_ns = THROTTLE_SLICE_NS * pct / (100 - pct);
	clock_gettime(CLOCK_REALTIME, &until);          /* vm->cond's clock */
	until.tv_sec += (time_t)(sleep_ns / 1000000000ull);
	until.tv_nsec += (long)(sleep_ns % 1000000000ull);
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&vm->lock);
	while (!vcpu->pause_req && !atomic_load(&vm->stopping) &&
	       atomic_load_explicit(&vm->throttle_pct, memory_order_relaxed) &&
	       pthread_cond_timedwait(&vm->cond, &vm->lock, &until) != ETIMEDOUT)
		;
	pthread_mutex_unlock(&vm->lock);
	vcpu->throttle_next_ns = mono_ns() + THROTTLE_SLICE_NS;
}
