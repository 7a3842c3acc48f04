/*
 * Host side of the built-in test guest: its workload options, its progress
 * counters and the page-by-page verification of a paused guest.
 *
 * The contract is include/vmig/guest-abi.h.  The guest writes its status
 * page and stamps while it runs; the host reads them without any exit or
 * lock, so reads of a running guest are snapshots of volatile memory and
 * only a paused guest can be verified exactly.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vmig/guest-abi.h"
#include "vmm-internal.h"

#define DEFAULT_WSS   (4ull << 20)

int vmig_guest_workload_check(const char *spec, uint64_t mem_size,
			      unsigned int nr_vcpus, struct vmig_err *err)
{
	uint64_t wss = DEFAULT_WSS, need, avail;
	char *copy, *tok, *save = NULL;
	int ret = 0;

	if (!spec || !*spec)
		goto check_size;
	copy = strdup(spec);
	if (!copy) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	for (tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
		char *val = strchr(tok, '=');
		uint64_t v;
		char *end;

		if (val)
			*val++ = 0;
		if (!strcmp(tok, "quiet") && !val)
			continue;
		if (!val || !*val) {
			vmig_err_set(err, -EINVAL, "bad --workload '%s': '%s' needs a value "
				     "(expected rate=PAGES_PER_S|max, wss=SIZE, gens=N, "
				     "fill=stamp|random|text, idle_after=N, quiet)",
				     spec, tok);
			ret = -EINVAL;
			break;
		}
		if (!strcmp(tok, "rate")) {
			if (!strcmp(val, "max"))
				continue;
			errno = 0;
			v = strtoull(val, &end, 10);
			if (errno || *end || *val == '-' || v == 0) {
				vmig_err_set(err, -EINVAL, "bad --workload rate '%s': give pages "
					     "per second per vCPU (a positive number) or 'max'", val);
				ret = -EINVAL;
				break;
			}
		} else if (!strcmp(tok, "wss")) {
			if (vmig_size_parse(val, &wss) < 0 || wss < VMIG_GUEST_PAGE_SIZE) {
				vmig_err_set(err, -EINVAL, "bad --workload wss '%s': give a size "
					     "of at least 4K, such as 64M", val);
				ret = -EINVAL;
				break;
			}
		} else if (!strcmp(tok, "gens") || !strcmp(tok, "idle_after")) {
			errno = 0;
			v = strtoull(val, &end, 10);
			(void)v;
			if (errno || *end || *val == '-') {
				vmig_err_set(err, -EINVAL, "bad --workload %s '%s': give a "
					     "number of passes (0 = %s)", tok, val,
					     tok[0] == 'g' ? "forever" : "never idle");
				ret = -EINVAL;
				break;
			}
		} else if (!strcmp(tok, "fill")) {
			if (strcmp(val, "stamp") && strcmp(val, "random") && strcmp(val, "text")) {
				vmig_err_set(err, -EINVAL, "bad --workload fill '%s': give "
					     "stamp, random or text", val);
				ret = -EINVAL;
				break;
			}
		} else {
			vmig_err_set(err, -EINVAL, "bad --workload: unknown key '%s' "
				     "(expected rate, wss, gens, fill, idle_after, quiet)", tok);
			ret = -EINVAL;
			break;
		}
	}
	free(copy);
	if (ret)
		return ret;
check_size:
	avail = (mem_size < VMIG_VM_LOW_RAM_END ? mem_size : VMIG_VM_LOW_RAM_END)
		- VMIG_GUEST_WS_START;
	if (mem_size > VMIG_VM_LOW_RAM_END)
		avail += mem_size - VMIG_VM_LOW_RAM_END;
	need = (wss + VMIG_GUEST_PAGE_SIZE - 1) / VMIG_GUEST_PAGE_SIZE * VMIG_GUEST_PAGE_SIZE;
	if (need > avail / nr_vcpus) {
		char a[32], b[32];

		vmig_size_format(need * nr_vcpus, a, sizeof(a));
		vmig_size_format(avail, b, sizeof(b));
		vmig_err_set(err, -EINVAL, "the workload's working sets need %s but the "
			     "guest has %s for them: lower wss or raise --memory", a, b);
		return -EINVAL;
	}
	return 0;
}

static volatile struct vmig_guest_status *status_page(const struct vmig_vm *vm)
{
	return vmig_vm_gpa_to_hva(vm, VMIG_GUEST_STATUS_GPA, VMIG_GUEST_PAGE_SIZE);
}

int vmig_guest_progress(const struct vmig_vm *vm, struct vmig_guest_progress *p)
{
	volatile struct vmig_guest_status *st = status_page(vm);
	unsigned int i, n;

	memset(p, 0, sizeof(*p));
	if (!st || st->magic != VMIG_GUEST_STATUS_MAGIC)
		return 0;
	n = st->nr_vcpus;
	if (n > VMIG_GUEST_MAX_VCPUS)
		n = VMIG_GUEST_MAX_VCPUS;
	p->present = true;
	p->nr_vcpus = n;
	for (i = 0; i < n; i++) {
		uint64_t g = st->vcpu[i].generation;

		if (i == 0 || g < p->generation)
			p->generation = g;
		p->pages_written += st->vcpu[i].pages_written;
		p->heartbeat += st->vcpu[i].heartbeat;
	}
	return 0;
}

int vmig_guest_set_iteration(const struct vmig_vm *vm, uint64_t iteration)
{
	volatile struct vmig_guest_status *st = status_page(vm);

	if (!st)
		return -EFAULT;
	st->host_iteration = iteration;
	return 0;
}

int vmig_guest_request_shutdown(const struct vmig_vm *vm)
{
	volatile struct vmig_guest_status *st = status_page(vm);

	/* Only the built-in guest reads this page: never write into a kernel's. */
	if (!st || vm->kernel || vm->boot.kernel || st->magic != VMIG_GUEST_STATUS_MAGIC)
		return -EFAULT;
	st->host_shutdown = 1;
	return 0;
}

/* The stamp a page holds after generation @gen (all zero for 0). */
static void expected_stamp(struct vmig_guest_stamp *s, uint64_t gpa, uint64_t gen,
			   unsigned int vcpu)
{
	memset(s, 0, sizeof(*s));
	if (!gen)
		return;
	s->magic = VMIG_GUEST_STAMP_MAGIC ^ gpa;
	s->generation = gen;
	s->vcpu = vcpu;
}

static bool stamp_is(const struct vmig_guest_stamp *s, uint64_t tail, uint64_t gpa,
		     uint64_t gen, unsigned int vcpu)
{
	struct vmig_guest_stamp e;

	expected_stamp(&e, gpa, gen, vcpu);
	if (!gen)
		return !s->magic && !s->generation && !s->iteration && !s->vcpu && !tail;
	return s->magic == e.magic && s->generation == gen && s->vcpu == vcpu && tail == gen;
}

/*
 * The guest writes a page's stamp, then cursor, pages_written and
 * checksum, in that order (guest-abi.h).  A vCPU stopped in between leaves
 * the last page written (at the cursor, or just before it) ahead of the
 * checksum by exactly that page's change, so the sums accepted are the
 * exact one and the one with that single page rolled back.
 */
/*
 * Page @cur may have been stopped half-written: the guest stores magic,
 * generation, iteration, vcpu, then the tail word.  True if the page is
 * the G-1 stamp with some prefix of those stores of the G stamp applied
 * (iteration is free: it is diagnostic).
 */
static bool stamp_is_partial(const struct vmig_guest_stamp *s, uint64_t tail, uint64_t gpa,
			     uint64_t gen, unsigned int vcpu)
{
	struct vmig_guest_stamp o, n;
	uint64_t got[4], was[4], now[4];
	unsigned int j, i;

	expected_stamp(&o, gpa, gen - 1, vcpu);
	expected_stamp(&n, gpa, gen, vcpu);
	got[0] = s->magic; got[1] = s->generation; got[2] = s->vcpu; got[3] = tail;
	was[0] = o.magic;  was[1] = o.generation;  was[2] = o.vcpu;  was[3] = gen - 1;
	now[0] = n.magic;  now[1] = n.generation;  now[2] = n.vcpu;  now[3] = gen;
	for (j = 0; j <= 4; j++) {
		bool ok = true;

		for (i = 0; i < 4 && ok; i++)
			ok = got[i] == (i < j ? now[i] : was[i]);
		if (ok)
			return true;
	}
	return false;
}

static int verify_vcpu(const struct vmig_vm *vm, const struct vmig_guest_status *st,
		       unsigned int v, struct vmig_err *err)
{
	const struct vmig_guest_vcpu *c = &st->vcpu[v];
	uint64_t k, n = c->nr_pages, gen = c->generation, cur = c->cursor;
	uint64_t sum = 0, last_delta = 0;
	bool have_last = false;

	if (cur > n || (gen == 0 && (cur || c->pages_written))) {
		vmig_err_set(err, -EBADMSG, "vCPU %u: progress counters are inconsistent "
			     "(generation %" PRIu64 ", cursor %" PRIu64 ", %" PRIu64 " pages)",
			     v, gen, cur, n);
		return -EBADMSG;
	}
	for (k = 0; k < n; k++) {
		uint64_t gpa = vmig_guest_page_gpa(st->low_end, c->first_page + k);
		const uint8_t *page = vmig_vm_gpa_to_hva(vm, gpa, VMIG_GUEST_PAGE_SIZE);
		struct vmig_guest_stamp s, old;
		uint64_t tail, want;
		bool last;

		if (!page) {
			vmig_err_set(err, -EBADMSG, "vCPU %u: work page %" PRIu64 " at gpa 0x%"
				     PRIx64 " is outside guest RAM", v, c->first_page + k, gpa);
			return -EBADMSG;
		}
		memcpy(&s, page, sizeof(s));
		memcpy(&tail, page + VMIG_GUEST_TAIL_OFFSET, sizeof(tail));
		want = k < cur ? gen : (gen ? gen - 1 : 0);
		last = false;
		if (k == cur && gen && stamp_is(&s, tail, gpa, gen, v)) {
			/* Written, cursor not yet moved when the vCPU stopped. */
			want = gen;
			last = true;
		} else if (k + 1 == cur && gen) {
			last = true;   /* unless page @cur turns out newer: it overrides */
		}
		if (k == cur && gen && !last && !stamp_is(&s, tail, gpa, want, v) &&
		    stamp_is_partial(&s, tail, gpa, gen, v)) {
			/* Half-written: the checksum still counts the old stamp. */
			expected_stamp(&old, gpa, gen - 1, v);
			sum += vmig_guest_stamp_hash(&old);
			continue;
		}
		if (!stamp_is(&s, tail, gpa, want, v)) {
			vmig_err_set(err, -EBADMSG, "vCPU %u: page at gpa 0x%" PRIx64
				     " (work page %" PRIu64 ") holds generation %" PRIu64
				     " (tail %" PRIu64 ", magic %s, vCPU %" PRIu64 "), expected %"
				     PRIu64 " (cursor %" PRIu64 " of %" PRIu64 ")", v, gpa,
				     c->first_page + k, s.generation, tail,
				     s.magic == (VMIG_GUEST_STAMP_MAGIC ^ gpa) ? "ok" : "bad",
				     s.vcpu, want, cur, n);
			return -EBADMSG;
		}
		if (last) {
			expected_stamp(&old, gpa, gen - 1, v);
			last_delta = vmig_guest_stamp_hash(&s) - vmig_guest_stamp_hash(&old);
			have_last = true;
		}
		sum += vmig_guest_stamp_hash(&s);
	}
	if (sum != c->checksum && !(have_last && sum - last_delta == c->checksum)) {
		vmig_err_set(err, -EBADMSG, "vCPU %u: checksum of its pages is 0x%" PRIx64
			     ", the guest recorded 0x%" PRIx64, v, sum, c->checksum);
		return -EBADMSG;
	}
	return 0;
}

int vmig_guest_verify(const struct vmig_vm *vm, struct vmig_err *err)
{
	const struct vmig_guest_status *src = (const void *)status_page(vm);
	struct vmig_guest_status *st;
	unsigned int v;
	int ret = 0;

	if (!src || src->magic != VMIG_GUEST_STATUS_MAGIC) {
		vmig_err_set(err, -EAGAIN, "the guest has not set up its status page yet");
		return -EAGAIN;
	}
	st = malloc(sizeof(*st));
	if (!st)
		return -ENOMEM;
	memcpy(st, src, sizeof(*st));
	if (st->nr_vcpus == 0 || st->nr_vcpus > VMIG_GUEST_MAX_VCPUS ||
	    st->abi_version != VMIG_GUEST_ABI_VERSION) {
		vmig_err_set(err, -EBADMSG, "the guest's status page is corrupt "
			     "(%u vCPUs, ABI version %u)", st->nr_vcpus, st->abi_version);
		ret = -EBADMSG;
	}
	for (v = 0; !ret && v < st->nr_vcpus; v++) {
		if (st->vcpu[v].state != VMIG_GUEST_VCPU_RUNNING &&
		    st->vcpu[v].state != VMIG_GUEST_VCPU_DONE) {
			vmig_err_set(err, -EAGAIN, "vCPU %u of the guest is still booting", v);
			ret = -EAGAIN;
			break;
		}
		ret = verify_vcpu(vm, st, v, err);
	}
	free(st);
	return ret;
}
