/*
 * Machine state as named sections: save from a paused VM, load into a
 * fresh one.
 *
 * Sections (name, instance, version 1), each the raw KVM structure of this
 * host's ABI, checked for exact size on load:
 *   per vCPU (instance = vCPU id): cpu.cpuid, cpu.mpstate, cpu.sregs2 or
 *   cpu.sregs, cpu.regs, cpu.xsave, cpu.xcrs, cpu.lapic, cpu.msrs,
 *   cpu.debugregs, cpu.events;
 *   per VM (instance 0): irqchip.pic-master, irqchip.pic-slave,
 *   irqchip.ioapic, pit, clock, serial; and, optional on load (a source
 *   without them gets the devices' reset state), serial.ext (the UART's
 *   receive buffer and interrupt state), cmos (RTC offset and NVRAM) and
 *   acpi.pm (the PM1 registers).
 *
 * A Linux guest's boot images, so that the VM can reboot wherever it is
 * (optional on load: without them a reboot ends the VM), version 1:
 *   linux.boot/0: u64 kernel bytes, u64 initrd bytes, u32 command line
 *   bytes, u32 chunk size, then the command line (no NUL);
 *   linux.kernel/I and linux.initrd/I: the images in chunks of the chunk
 *   size, instance I the I-th (a record body is at most 64 MiB).
 * They go with the rest of the state while the VM is paused, so they add
 * their size to a migration's downtime (a few MB for a small kernel and
 * initramfs).
 *
 * Load order matters and is fixed here, whatever order the sections
 * arrived in: CPUID before anything (it decides which MSRs and XSAVE
 * features exist); MP state first of the rest; the LAPIC before the MSRs
 * (a TSC-deadline write while the LAPIC is not yet in TSC-deadline mode
 * is dropped, and the guest loses its timer); vCPU events last (they hold
 * pending exceptions and interrupts that the other writes could clear).
 * The VM-wide irqchip, PIT and clock go before any vCPU state.
 *
 * Threads: the owner thread, with the VM paused (save) or not yet started
 * (load).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "vmm-internal.h"

struct msr_entry {
	uint32_t index;
	uint32_t reserved;
	uint64_t data;
};

/* Every MSR of KVM_GET_MSR_INDEX_LIST that this KVM lets us read. */
static int readable_msrs(struct vmig_vm *vm, struct vmig__vcpu *vcpu,
			 uint32_t **out, uint32_t *n_out)
{
	struct kvm_msr_list probe = { .nmsrs = 0 }, *list;
	struct kvm_msrs *m;
	uint32_t i, n = 0;
	int ret;

	if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
		return -errno;
	list = calloc(1, sizeof(*list) + probe.nmsrs * sizeof(uint32_t));
	m = calloc(1, sizeof(*m) + sizeof(struct kvm_msr_entry));
	*out = calloc(probe.nmsrs ? probe.nmsrs : 1, sizeof(uint32_t));
	if (!list || !m || !*out) {
		ret = -ENOMEM;
		goto out;
	}
	list->nmsrs = probe.nmsrs;
	if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
		ret = -errno;
		goto out;
	}
	for (i = 0; i < list->nmsrs; i++) {
		m->nmsrs = 1;
		m->entries[0].index = list->indices[i];
		if (ioctl(vcpu->fd, KVM_GET_MSRS, m) == 1)
			(*out)[n++] = list->indices[i];
	}
	*n_out = n;
	ret = 0;
out:
	free(list);
	free(m);
	if (ret) {
		free(*out);
		*out = NULL;
	}
	return ret;
}

static int save_msrs(struct vmig_vm *vm, struct vmig__vcpu *vcpu,
		     vmig_vm_state_emit_fn *emit, void *arg, struct vmig_err *err)
{
	struct kvm_msrs *m = NULL;
	struct msr_entry *out = NULL;
	uint32_t i, n = 0, *idx = NULL;
	int ret;

	ret = readable_msrs(vm, vcpu, &idx, &n);
	if (ret) {
		vmig_err_set(err, ret, "vCPU %u: cannot list MSRs: %s", vcpu->id, strerror(-ret));
		return ret;
	}
	m = calloc(1, sizeof(*m) + n * sizeof(struct kvm_msr_entry));
	out = calloc(n ? n : 1, sizeof(*out));
	if (!m || !out) {
		ret = -ENOMEM;
		vmig_err_set(err, ret, "out of memory");
		goto out;
	}
	m->nmsrs = n;
	for (i = 0; i < n; i++)
		m->entries[i].index = idx[i];
	ret = ioctl(vcpu->fd, KVM_GET_MSRS, m);
	if (ret < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "vCPU %u: cannot read MSRs: %s", vcpu->id, strerror(-ret));
		goto out;
	}
	if (ret != (int)n) {
		vmig_err_set(err, -EIO, "vCPU %u: reading %u MSRs stopped at MSR 0x%x",
			     vcpu->id, n, m->entries[ret].index);
		ret = -EIO;
		goto out;
	}
	for (i = 0; i < n; i++)
		out[i] = (struct msr_entry){ m->entries[i].index, 0, m->entries[i].data };
	ret = emit(arg, "cpu.msrs", 1, vcpu->id, out, n * sizeof(*out));
out:
	free(idx);
	free(m);
	free(out);
	return ret;
}

static int xsave_size(struct vmig_vm *vm)
{
	int size = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);

	return size > (int)sizeof(struct kvm_xsave) ? size : (int)sizeof(struct kvm_xsave);
}

static bool have_sregs2(struct vmig_vm *vm)
{
	return ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SREGS2) > 0;
}

/* GET ioctl into a buffer of @size, then emit it. */
static int save_one(int fd, unsigned long req, size_t size, const char *name,
		    uint32_t instance, vmig_vm_state_emit_fn *emit, void *arg,
		    struct vmig_err *err)
{
	void *buf = calloc(1, size);
	int ret;

	if (!buf) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	if (ioctl(fd, req, buf) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot read state %s/%u: %s", name, instance,
			     strerror(-ret));
	} else {
		ret = emit(arg, name, 1, instance, buf, size);
	}
	free(buf);
	return ret;
}

static int save_cpuid(struct vmig__vcpu *vcpu, vmig_vm_state_emit_fn *emit, void *arg,
		       struct vmig_err *err)
{
	uint32_t nent = vcpu->vm->cpuid->nent;
	size_t size = sizeof(struct kvm_cpuid2) + nent * sizeof(struct kvm_cpuid_entry2);
	struct kvm_cpuid2 *c = calloc(1, size);
	int ret;

	if (!c)
		return -ENOMEM;
	c->nent = nent;
	if (ioctl(vcpu->fd, KVM_GET_CPUID2, c) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "vCPU %u: cannot read CPUID: %s", vcpu->id, strerror(-ret));
	} else {
		ret = emit(arg, "cpu.cpuid", 1, vcpu->id, c->entries,
			   c->nent * sizeof(struct kvm_cpuid_entry2));
	}
	free(c);
	return ret;
}

static int save_vcpu(struct vmig_vm *vm, struct vmig__vcpu *v, vmig_vm_state_emit_fn *emit,
		     void *arg, struct vmig_err *err)
{
	int ret;

#define SAVE(req, type, name) \
	do { \
		ret = save_one(v->fd, req, sizeof(type), name, v->id, emit, arg, err); \
		if (ret) \
			return ret; \
	} while (0)

	ret = save_cpuid(v, emit, arg, err);
	if (ret)
		return ret;
	SAVE(KVM_GET_MP_STATE, struct kvm_mp_state, "cpu.mpstate");
	if (have_sregs2(vm))
		SAVE(KVM_GET_SREGS2, struct kvm_sregs2, "cpu.sregs2");
	else
		SAVE(KVM_GET_SREGS, struct kvm_sregs, "cpu.sregs");
	SAVE(KVM_GET_REGS, struct kvm_regs, "cpu.regs");
	ret = save_one(v->fd, KVM_GET_XSAVE2, xsave_size(vm), "cpu.xsave", v->id, emit, arg, err);
	if (ret)
		return ret;
	SAVE(KVM_GET_XCRS, struct kvm_xcrs, "cpu.xcrs");
	SAVE(KVM_GET_LAPIC, struct kvm_lapic_state, "cpu.lapic");
	ret = save_msrs(vm, v, emit, arg, err);
	if (ret)
		return ret;
	SAVE(KVM_GET_DEBUGREGS, struct kvm_debugregs, "cpu.debugregs");
	SAVE(KVM_GET_VCPU_EVENTS, struct kvm_vcpu_events, "cpu.events");
#undef SAVE
	return 0;
}

static int save_irqchip(struct vmig_vm *vm, unsigned int chip, const char *name,
			vmig_vm_state_emit_fn *emit, void *arg, struct vmig_err *err)
{
	struct kvm_irqchip ic = { .chip_id = chip };

	if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &ic) < 0) {
		vmig_err_set(err, -errno, "cannot read %s: %s", name, strerror(errno));
		return -errno;
	}
	return emit(arg, name, 1, 0, &ic.chip, sizeof(ic.chip));
}

/* ---- a Linux guest's boot images ---- */

#define BOOT_CHUNK      (16u << 20)
#define BOOT_HDR_LEN    24u
#define BOOT_CMDLINE_MAX 65536u

static int save_chunks(const char *name, const uint8_t *p, size_t len,
		       vmig_vm_state_emit_fn *emit, void *arg)
{
	uint32_t i;
	int ret = 0;

	for (i = 0; !ret && (size_t)i * BOOT_CHUNK < len; i++) {
		size_t off = (size_t)i * BOOT_CHUNK;

		ret = emit(arg, name, 1, i, p + off, len - off < BOOT_CHUNK ? len - off : BOOT_CHUNK);
	}
	return ret;
}

static int save_boot(struct vmig_vm *vm, vmig_vm_state_emit_fn *emit, void *arg,
		     struct vmig_err *err)
{
	const struct vmig__boot *b = &vm->boot;
	size_t cl = b->cmdline ? strlen(b->cmdline) : 0;
	uint64_t k = b->kernel_len, i = b->initrd_len;
	uint32_t c = (uint32_t)cl, chunk = BOOT_CHUNK;
	uint8_t *hdr;
	int ret;

	if (!b->kernel)
		return 0;
	hdr = malloc(BOOT_HDR_LEN + cl);
	if (!hdr) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	memcpy(hdr, &k, 8);
	memcpy(hdr + 8, &i, 8);
	memcpy(hdr + 16, &c, 4);
	memcpy(hdr + 20, &chunk, 4);
	memcpy(hdr + BOOT_HDR_LEN, b->cmdline, cl);
	ret = emit(arg, "linux.boot", 1, 0, hdr, BOOT_HDR_LEN + cl);
	free(hdr);
	if (!ret)
		ret = save_chunks("linux.kernel", b->kernel, b->kernel_len, emit, arg);
	if (!ret)
		ret = save_chunks("linux.initrd", b->initrd, b->initrd_len, emit, arg);
	return ret;
}

int vmig_vm_state_save(struct vmig_vm *vm, vmig_vm_state_emit_fn *emit, void *arg,
		       struct vmig_err *err)
{
	return vmig_vm_state_save_parts(vm, VMIG_STATE_BOOT | VMIG_STATE_MACHINE, emit, arg,
					err);
}

int vmig_vm_state_save_parts(struct vmig_vm *vm, unsigned int parts,
			     vmig_vm_state_emit_fn *emit, void *arg, struct vmig_err *err)
{
	struct vmig__serial_state ss;
	struct vmig__serial_ext_state *sx;
	struct vmig__cmos_state cs;
	struct vmig__acpi_pm_state ps;
	unsigned int i;
	int ret;

	if (!(parts & VMIG_STATE_MACHINE))
		return parts & VMIG_STATE_BOOT ? save_boot(vm, emit, arg, err) : 0;
	if (vmig_vm_state(vm) != VMIG_VM_PAUSED && vm->state != VMIG_VM_CREATED) {
		vmig_err_set(err, -EBUSY, "the VM must be paused to save its state");
		return -EBUSY;
	}
	ret = save_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "irqchip.pic-master", emit, arg, err);
	if (!ret)
		ret = save_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "irqchip.pic-slave", emit, arg, err);
	if (!ret)
		ret = save_irqchip(vm, KVM_IRQCHIP_IOAPIC, "irqchip.ioapic", emit, arg, err);
	if (!ret)
		ret = save_one(vm->vm_fd, KVM_GET_PIT2, sizeof(struct kvm_pit_state2), "pit", 0,
			       emit, arg, err);
	if (!ret)
		ret = save_one(vm->vm_fd, KVM_GET_CLOCK, sizeof(struct kvm_clock_data), "clock", 0,
			       emit, arg, err);
	if (ret)
		return ret;
	sx = malloc(sizeof(*sx));
	if (!sx) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	vmig__serial_save(&vm->serial, &ss, sx);
	ret = emit(arg, "serial", 1, 0, &ss, sizeof(ss));
	if (!ret)
		ret = emit(arg, "serial.ext", 1, 0, sx, sizeof(*sx));
	free(sx);
	vmig__cmos_save(&vm->cmos, &cs);
	if (!ret)
		ret = emit(arg, "cmos", 1, 0, &cs, sizeof(cs));
	vmig__acpi_pm_save(&vm->acpi_pm, &ps);
	if (!ret)
		ret = emit(arg, "acpi.pm", 1, 0, &ps, sizeof(ps));
	if (!ret && (parts & VMIG_STATE_BOOT))
		ret = save_boot(vm, emit, arg, err);
	for (i = 0; !ret && i < vm->cfg.nr_vcpus; i++)
		ret = save_vcpu(vm, &vm->vcpus[i], emit, arg, err);
	return ret;
}

/* ---- load ---- */

static const struct vmig_state_section *find(const struct vmig_state_section *s, size_t n,
					      const char *name, uint32_t instance)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (s[i].instance == instance && !strcmp(s[i].name, name))
			return &s[i];
	return NULL;
}

/* The section @name/@instance, of exactly @size bytes (0: any size). */
static int need(const struct vmig_state_section *s, size_t n, const char *name,
		uint32_t instance, size_t size, const struct vmig_state_section **out,
		struct vmig_err *err)
{
	const struct vmig_state_section *sec = find(s, n, name, instance);

	if (!sec) {
		vmig_err_set(err, -EBADMSG, "the state lacks section %s/%u", name, instance);
		return -EBADMSG;
	}
	if (sec->version != 1) {
		vmig_err_set(err, -EBADMSG, "section %s/%u has version %u; this vmig reads "
			     "version 1", name, instance, sec->version);
		return -EBADMSG;
	}
	if (size && sec->len != size) {
		vmig_err_set(err, -EBADMSG, "section %s/%u is %zu bytes, expected %zu "
			     "(different KVM ABI?)", name, instance, sec->len, size);
		return -EBADMSG;
	}
	*out = sec;
	return 0;
}

static int set_one(int fd, unsigned long req, const struct vmig_state_section *sec,
		   struct vmig_err *err)
{
	void *buf = malloc(sec->len ? sec->len : 1);
	int ret = 0;

	if (!buf)
		return -ENOMEM;
	memcpy(buf, sec->data, sec->len);
	if (ioctl(fd, req, buf) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "KVM refused state %s/%u: %s", sec->name, sec->instance,
			     strerror(-ret));
	}
	free(buf);
	return ret;
}

static int load_cpuid(struct vmig__vcpu *v, const struct vmig_state_section *sec,
		      struct vmig_err *err)
{
	size_t n = sec->len / sizeof(struct kvm_cpuid_entry2);
	struct kvm_cpuid2 *c;
	int ret = 0;

	if (sec->len % sizeof(struct kvm_cpuid_entry2) || n == 0 || n > 4096) {
		vmig_err_set(err, -EBADMSG, "section cpu.cpuid/%u has a bad size %zu",
			     v->id, sec->len);
		return -EBADMSG;
	}
	c = calloc(1, sizeof(*c) + sec->len);
	if (!c)
		return -ENOMEM;
	c->nent = n;
	memcpy(c->entries, sec->data, sec->len);
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "vCPU %u: this host refuses the source's CPUID: %s",
			     v->id, strerror(-ret));
	}
	free(c);
	return ret;
}

static int load_msrs(struct vmig__vcpu *v, const struct vmig_state_section *sec,
		     struct vmig_err *err)
{
	size_t n = sec->len / sizeof(struct msr_entry), i;
	const struct msr_entry *in = sec->data;
	struct kvm_msrs *m;
	int ret;

	if (sec->len % sizeof(struct msr_entry) || n > 4096) {
		vmig_err_set(err, -EBADMSG, "section cpu.msrs/%u has a bad size %zu",
			     v->id, sec->len);
		return -EBADMSG;
	}
	m = calloc(1, sizeof(*m) + n * sizeof(struct kvm_msr_entry));
	if (!m)
		return -ENOMEM;
	m->nmsrs = n;
	for (i = 0; i < n; i++) {
		m->entries[i].index = in[i].index;
		m->entries[i].data = in[i].data;
	}
	ret = ioctl(v->fd, KVM_SET_MSRS, m);
	if (ret != (int)n) {
		if (ret < 0) {
			ret = -errno;
			vmig_err_set(err, ret, "vCPU %u: cannot set MSRs: %s", v->id, strerror(-ret));
		} else {
			vmig_err_set(err, -EINVAL, "vCPU %u: this host refuses MSR 0x%x "
				     "(value 0x%llx)", v->id, m->entries[ret].index,
				     (unsigned long long)m->entries[ret].data);
			ret = -EINVAL;
		}
	} else {
		ret = 0;
	}
	free(m);
	return ret;
}

static int load_vcpu(struct vmig_vm *vm, struct vmig__vcpu *v,
		     const struct vmig_state_section *s, size_t n, struct vmig_err *err)
{
	const struct vmig_state_section *sec;
	int ret;

#define LOAD(name, size, req) \
	do { \
		ret = need(s, n, name, v->id, size, &sec, err); \
		if (!ret) \
			ret = set_one(v->fd, req, sec, err); \
		if (ret) \
			return ret; \
	} while (0)

	ret = need(s, n, "cpu.cpuid", v->id, 0, &sec, err);
	if (!ret)
		ret = load_cpuid(v, sec, err);
	if (ret)
		return ret;
	LOAD("cpu.mpstate", sizeof(struct kvm_mp_state), KVM_SET_MP_STATE);
	if (find(s, n, "cpu.sregs2", v->id)) {
		if (!have_sregs2(vm)) {
			vmig_err_set(err, -ENOTSUP, "the source sent SREGS2 state and this "
				     "host's KVM lacks KVM_CAP_SREGS2");
			return -ENOTSUP;
		}
		LOAD("cpu.sregs2", sizeof(struct kvm_sregs2), KVM_SET_SREGS2);
	} else {
		LOAD("cpu.sregs", sizeof(struct kvm_sregs), KVM_SET_SREGS);
	}
	LOAD("cpu.regs", sizeof(struct kvm_regs), KVM_SET_REGS);
	LOAD("cpu.xsave", (size_t)xsave_size(vm), KVM_SET_XSAVE);
	LOAD("cpu.xcrs", sizeof(struct kvm_xcrs), KVM_SET_XCRS);
	LOAD("cpu.lapic", sizeof(struct kvm_lapic_state), KVM_SET_LAPIC);
	ret = need(s, n, "cpu.msrs", v->id, 0, &sec, err);
	if (!ret)
		ret = load_msrs(v, sec, err);
	if (ret)
		return ret;
	LOAD("cpu.debugregs", sizeof(struct kvm_debugregs), KVM_SET_DEBUGREGS);
	LOAD("cpu.events", sizeof(struct kvm_vcpu_events), KVM_SET_VCPU_EVENTS);
#undef LOAD
	return 0;
}

static int load_irqchip(struct vmig_vm *vm, unsigned int chip, const char *name,
			const struct vmig_state_section *s, size_t n, struct vmig_err *err)
{
	const struct vmig_state_section *sec;
	struct kvm_irqchip ic = { .chip_id = chip };
	int ret = need(s, n, name, 0, sizeof(ic.chip), &sec, err);

	if (ret)
		return ret;
	memcpy(&ic.chip, sec->data, sizeof(ic.chip));
	if (ioctl(vm->vm_fd, KVM_SET_IRQCHIP, &ic) < 0) {
		vmig_err_set(err, -errno, "KVM refused state %s: %s", name, strerror(errno));
		return -errno;
	}
	return 0;
}

/* Whether to let KVM advance the saved clock by the real time since the save. */
static bool live_clock(struct vmig_vm *vm, const struct kvm_clock_data *c)
{
	int caps = ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_ADJUST_CLOCK);
	struct timespec now;
	uint64_t now_ns;

	if (caps <= 0 || !(caps & KVM_CLOCK_REALTIME) || !(c->flags & KVM_CLOCK_REALTIME))
		return false;
	clock_gettime(CLOCK_REALTIME, &now);
	now_ns = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
	return now_ns >= c->realtime && now_ns - c->realtime < 60ull * 1000000000ull;
}

/* An optional section: NULL if absent, -EBADMSG if present but wrong. */
static int optional(const struct vmig_state_section *s, size_t n, const char *name,
		    size_t size, const struct vmig_state_section **out, struct vmig_err *err)
{
	*out = NULL;
	if (!find(s, n, name, 0))
		return 0;
	return need(s, n, name, 0, size, out, err);
}

/*
 * The UART (after the irqchip: it drives IRQ 4 to its saved level), CMOS
 * and the ACPI PM1 registers (likewise for the SCI, IRQ 9).
 */
static int load_devices(struct vmig_vm *vm, const struct vmig_state_section *serial,
			const struct vmig_state_section *s, size_t n, struct vmig_err *err)
{
	const struct vmig_state_section *sx, *cs, *ps;
	int ret;

	ret = optional(s, n, "serial.ext", sizeof(struct vmig__serial_ext_state), &sx, err);
	if (!ret)
		ret = optional(s, n, "cmos", sizeof(struct vmig__cmos_state), &cs, err);
	if (!ret)
		ret = optional(s, n, "acpi.pm", sizeof(struct vmig__acpi_pm_state), &ps, err);
	if (ret)
		return ret;
	vmig__serial_load(&vm->serial, serial->data, sx ? sx->data : NULL);
	if (cs)
		vmig__cmos_load(&vm->cmos, cs->data);
	if (ps)
		vmig__acpi_pm_load(vm, ps->data);
	return 0;
}

/*
 * @len bytes from sections @name/0, /1, ... of exactly @chunk bytes each
 * but the last; every one checked before anything is allocated, so the
 * allocation is no larger than what arrived.
 */
static int load_chunks(const struct vmig_state_section *s, size_t n, const char *name,
		       uint64_t len, uint32_t chunk, uint8_t **out, struct vmig_err *err)
{
	uint64_t nr = (len + chunk - 1) / chunk, i;
	const struct vmig_state_section *sec;
	uint8_t *buf;
	int ret;

	*out = NULL;
	if (!len)
		return 0;
	for (i = 0; i < nr; i++) {
		uint64_t want = len - i * chunk < chunk ? len - i * chunk : chunk;

		ret = need(s, n, name, (uint32_t)i, (size_t)want, &sec, err);
		if (ret)
			return ret;
	}
	for (i = 0; i < n; i++) {
		if (s[i].instance >= nr && !strcmp(s[i].name, name)) {
			vmig_err_set(err, -EBADMSG, "section %s/%u is past the %" PRIu64
				     " chunks linux.boot says", name, s[i].instance, nr);
			return -EBADMSG;
		}
	}
	buf = malloc((size_t)len);
	if (!buf) {
		vmig_err_set(err, -ENOMEM, "out of memory for the guest's %s", name);
		return -ENOMEM;
	}
	for (i = 0; i < nr; i++) {
		sec = find(s, n, name, (uint32_t)i);
		memcpy(buf + i * chunk, sec->data, sec->len);
	}
	*out = buf;
	return 0;
}

static int load_boot(struct vmig_vm *vm, const struct vmig_state_section *s, size_t n,
		     struct vmig_err *err)
{
	const struct vmig_state_section *sec;
	struct vmig__boot b = { 0 };
	uint64_t k, i;
	uint32_t c, chunk;
	int ret;

	if (!find(s, n, "linux.boot", 0))
		return 0;
	ret = need(s, n, "linux.boot", 0, 0, &sec, err);
	if (ret)
		return ret;
	if (sec->len < BOOT_HDR_LEN) {
		vmig_err_set(err, -EBADMSG, "section linux.boot/0 is %zu bytes, too short",
			     sec->len);
		return -EBADMSG;
	}
	memcpy(&k, sec->data, 8);
	memcpy(&i, (const uint8_t *)sec->data + 8, 8);
	memcpy(&c, (const uint8_t *)sec->data + 16, 4);
	memcpy(&chunk, (const uint8_t *)sec->data + 20, 4);
	if (k == 0 || k > (1ull << 30) || i > (2ull << 30) || c >= BOOT_CMDLINE_MAX ||
	    c != sec->len - BOOT_HDR_LEN || chunk < 4096 || chunk > (32u << 20)) {
		vmig_err_set(err, -EBADMSG, "section linux.boot/0 is damaged (kernel %" PRIu64
			     " bytes, initrd %" PRIu64 ", command line %u, chunk %u)", k, i, c,
			     chunk);
		return -EBADMSG;
	}
	b.kernel_len = (size_t)k;
	b.initrd_len = (size_t)i;
	b.cmdline = malloc(c + 1);
	if (!b.cmdline) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	memcpy(b.cmdline, (const uint8_t *)sec->data + BOOT_HDR_LEN, c);
	b.cmdline[c] = 0;
	ret = load_chunks(s, n, "linux.kernel", k, chunk, &b.kernel, err);
	if (!ret)
		ret = load_chunks(s, n, "linux.initrd", i, chunk, &b.initrd, err);
	if (ret) {
		vmig__boot_free(&b);
		return ret;
	}
	vmig__boot_free(&vm->boot);
	vm->boot = b;
	return 0;
}

int vmig_vm_state_load(struct vmig_vm *vm, const struct vmig_state_section *s, size_t n,
		       struct vmig_err *err)
{
	const struct vmig_state_section *sec;
	struct kvm_clock_data clock;
	unsigned int i;
	int ret;

	if (vm->state != VMIG_VM_CREATED) {
		vmig_err_set(err, -EBUSY, "state can only be loaded into a VM not yet started");
		return -EBUSY;
	}
	ret = load_boot(vm, s, n, err);
	if (!ret)
		ret = load_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "irqchip.pic-master", s, n, err);
	if (!ret)
		ret = load_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "irqchip.pic-slave", s, n, err);
	if (!ret)
		ret = load_irqchip(vm, KVM_IRQCHIP_IOAPIC, "irqchip.ioapic", s, n, err);
	if (!ret)
		ret = need(s, n, "pit", 0, sizeof(struct kvm_pit_state2), &sec, err);
	if (!ret)
		ret = set_one(vm->vm_fd, KVM_SET_PIT2, sec, err);
	if (!ret)
		ret = need(s, n, "serial", 0, sizeof(struct vmig__serial_state), &sec, err);
	if (ret)
		return ret;
	ret = load_devices(vm, sec, s, n, err);
	if (ret)
		return ret;

	for (i = 0; i < vm->cfg.nr_vcpus; i++) {
		ret = load_vcpu(vm, &vm->vcpus[i], s, n, err);
		if (ret)
			return ret;
	}
	if (find(s, n, "cpu.mpstate", vm->cfg.nr_vcpus)) {
		vmig_err_set(err, -EBADMSG, "the state has more vCPUs than this VM's %u",
			     vm->cfg.nr_vcpus);
		return -EBADMSG;
	}

	/*
	 * The clock last: KVM_SET_CLOCK sets kvmclock's base so the guest's
	 * clock continues from the source's value.  When the source also
	 * recorded its host's CLOCK_REALTIME at the save, and this KVM takes
	 * KVM_CLOCK_REALTIME, KVM adds the real time that passed since, so a
	 * live-migrated guest's clock neither stalls for the downtime nor
	 * falls behind the hosts'.  A state older than a minute is a restore
	 * from a file: the clock resumes where it stopped, as after a pause
	 * (a guest clock jumping by hours would upset its timers more than a
	 * stale wall clock, which NTP fixes).  Other flags are not accepted back.
	 */
	ret = need(s, n, "clock", 0, sizeof(clock), &sec, err);
	if (ret)
		return ret;
	memcpy(&clock, sec->data, sizeof(clock));
	clock.flags = live_clock(vm, &clock) ? KVM_CLOCK_REALTIME : 0;
	if (ioctl(vm->vm_fd, KVM_SET_CLOCK, &clock) < 0) {
		vmig_err_set(err, -errno, "KVM refused the guest clock: %s", strerror(errno));
		return -errno;
	}
	return 0;
}
