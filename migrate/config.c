/*
 * The CONFIG record: what the destination needs to build the VM before
 * any page arrives (name, RAM size and layout, vCPUs, the test guest's
 * workload) and to refuse a VM it cannot run (CPU features) before the
 * source has sent gigabytes.
 *
 * The body is a JSON object; unknown keys are ignored (a newer source may
 * add optional facts), missing or ill-typed required keys are refused.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <linux/kvm.h>

#include <json-c/json.h>

#include "vmig/vm.h"
#include "migrate-internal.h"

uint64_t vmig__now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* CPUID leaves whose feature bits the destination must offer. */
static const struct { uint32_t fn, idx; } feature_leaves[] = {
	{ 0x1, 0 }, { 0x7, 0 }, { 0xd, 1 }, { 0x80000001, 0 },
};

static int read_supported_cpuid(struct kvm_cpuid2 **out)
{
	unsigned int nent;
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	for (nent = 64; nent <= 4096; nent *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));

		if (!c) {
			close(fd);
			return -ENOMEM;
		}
		c->nent = nent;
		if (ioctl(fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			close(fd);
			*out = c;
			return 0;
		}
		free(c);
		if (errno != E2BIG)
			break;
	}
	close(fd);
	return -EIO;
}

static const struct kvm_cpuid_entry2 *find_leaf(const struct kvm_cpuid2 *c, uint32_t fn,
						uint32_t idx)
{
	uint32_t i;

	for (i = 0; i < c->nent; i++)
		if (c->entries[i].function == fn &&
		    (c->entries[i].index == idx ||
		     !(c->entries[i].flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)))
			return &c->entries[i];
	return NULL;
}

struct json_object *vmig__config_build(struct vmig_vm *vm, bool running, bool resume,
				       bool live)
{
	const struct vmig_vm_config *cfg = vmig_vm_config(vm);
	const struct vmig_mem_region *r;
	struct json_object *o = json_object_new_object(), *regs, *feats;
	struct kvm_cpuid2 *c = NULL;
	unsigned int i, n = vmig_vm_regions(vm, &r);

	json_object_object_add(o, "vmig_version", json_object_new_string(PACKAGE_VERSION));
	json_object_object_add(o, "name", json_object_new_string(cfg->name));
	json_object_object_add(o, "vcpus", json_object_new_int((int)cfg->nr_vcpus));
	json_object_object_add(o, "memory", json_object_new_uint64(cfg->mem_size));
	regs = json_object_new_array();
	for (i = 0; i < n; i++) {
		struct json_object *e = json_object_new_object();

		json_object_object_add(e, "gpa", json_object_new_uint64(r[i].gpa));
		json_object_object_add(e, "size", json_object_new_uint64(r[i].size));
		json_object_array_add(regs, e);
	}
	json_object_object_add(o, "regions", regs);
	if (cfg->workload)
		json_object_object_add(o, "workload", json_object_new_string(cfg->workload));
	json_object_object_add(o, "running", json_object_new_boolean(running));
	json_object_object_add(o, "resume", json_object_new_boolean(resume));
	json_object_object_add(o, "live", json_object_new_boolean(live));

	/* The features KVM offers here are what the guest may have seen. */
	feats = json_object_new_array();
	if (read_supported_cpuid(&c) == 0) {
		for (i = 0; i < sizeof(feature_leaves) / sizeof(feature_leaves[0]); i++) {
			const struct kvm_cpuid_entry2 *e = find_leaf(c, feature_leaves[i].fn,
								     feature_leaves[i].idx);
			struct json_object *a;

			if (!e)
				continue;
			a = json_object_new_array();
			json_object_array_add(a, json_object_new_uint64(e->function));
			json_object_array_add(a, json_object_new_uint64(feature_leaves[i].idx));
			json_object_array_add(a, json_object_new_uint64(e->eax));
			json_object_array_add(a, json_object_new_uint64(e->ebx));
			json_object_array_add(a, json_object_new_uint64(e->ecx));
			json_object_array_add(a, json_object_new_uint64(e->edx));
			json_object_array_add(feats, a);
		}
		free(c);
	}
	json_object_object_add(o, "cpuid", feats);
	return o;
}

static int get_u64(struct json_object *o, const char *key, uint64_t *v, struct vmig_err *err)
{
	struct json_object *x;

	if (!json_object_object_get_ex(o, key, &x) || !json_object_is_type(x, json_type_int) ||
	    json_object_get_int64(x) < 0) {
		vmig_err_set(err, -EPROTO, "the stream's configuration lacks a valid \"%s\"", key);
		return -EPROTO;
	}
	*v = json_object_get_uint64(x);
	return 0;
}

static bool get_bool(struct json_object *o, const char *key)
{
	struct json_object *x;

	return json_object_object_get_ex(o, key, &x) && json_object_is_type(x, json_type_boolean) &&
	       json_object_get_boolean(x);
}

int vmig__config_parse(struct json_object *o, struct vmig__config *c, struct vmig_err *err)
{
	struct json_object *x, *regs;
	uint64_t vcpus, low, v;
	size_t i, n;
	int ret;

	memset(c, 0, sizeof(*c));
	if (!json_object_object_get_ex(o, "name", &x) || !json_object_is_type(x, json_type_string) ||
	    vmig_vm_name_valid(json_object_get_string(x)) < 0) {
		vmig_err_set(err, -EPROTO, "the stream's configuration lacks a valid VM name");
		return -EPROTO;
	}
	snprintf(c->name, sizeof(c->name), "%s", json_object_get_string(x));
	ret = get_u64(o, "vcpus", &vcpus, err);
	if (!ret)
		ret = get_u64(o, "memory", &c->mem_size, err);
	if (ret)
		return ret;
	if (vcpus < 1 || vcpus > VMIG_VM_MAX_VCPUS) {
		vmig_err_set(err, -ENOTSUP, "the VM has %" PRIu64 " vCPUs; this vmig runs 1 to %u",
			     vcpus, VMIG_VM_MAX_VCPUS);
		return -ENOTSUP;
	}
	c->nr_vcpus = (unsigned int)vcpus;
	if (c->mem_size < (16ull << 20) || c->mem_size % (2ull << 20) || c->mem_size > (1ull << 46)) {
		vmig_err_set(err, -ENOTSUP, "the VM's memory size %" PRIu64 " bytes is not one "
			     "this vmig can lay out", c->mem_size);
		return -ENOTSUP;
	}

	/* The layout must be exactly the one this vmig builds for that size. */
	low = c->mem_size < VMIG_VM_LOW_RAM_END ? c->mem_size : VMIG_VM_LOW_RAM_END;
	if (!json_object_object_get_ex(o, "regions", &regs) ||
	    !json_object_is_type(regs, json_type_array)) {
		vmig_err_set(err, -EPROTO, "the stream's configuration lacks the memory regions");
		return -EPROTO;
	}
	n = json_object_array_length(regs);
	if (n != (c->mem_size > low ? 2u : 1u)) {
		vmig_err_set(err, -ENOTSUP, "the VM's memory layout (%zu regions) differs from "
			     "the one this vmig builds for %" PRIu64 " MiB", n, c->mem_size >> 20);
		return -ENOTSUP;
	}
	for (i = 0; i < n; i++) {
		struct json_object *e = json_object_array_get_idx(regs, i);
		uint64_t gpa, size;

		if (!e || get_u64(e, "gpa", &gpa, err) || get_u64(e, "size", &size, err))
			return -EPROTO;
		if (gpa != (i ? VMIG_VM_HIGH_RAM_START : 0) ||
		    size != (i ? c->mem_size - low : low)) {
			vmig_err_set(err, -ENOTSUP, "the VM's memory region %zu (0x%" PRIx64
				     ", %" PRIu64 " bytes) differs from this vmig's layout", i,
				     gpa, size);
			return -ENOTSUP;
		}
	}
	if (json_object_object_get_ex(o, "workload", &x) &&
	    json_object_is_type(x, json_type_string)) {
		snprintf(c->workload, sizeof(c->workload), "%s", json_object_get_string(x));
		c->has_workload = true;
	}
	c->running = get_bool(o, "running");
	c->resume = get_bool(o, "resume");
	c->live = get_bool(o, "live");
	c->channels = 1;
	if (json_object_object_get_ex(o, "channels", &x)) {
		if (get_u64(o, "channels", &v, err) || get_u64(o, "session", &c->session, err))
			return -EPROTO;
		if (v < 1 || v > VMIG_MIGRATE_MAX_CHANNELS) {
			vmig_err_set(err, -ENOTSUP, "the source uses %" PRIu64 " channels; this "
				     "vmig takes 1 to %u", v, VMIG_MIGRATE_MAX_CHANNELS);
			return -ENOTSUP;
		}
		c->channels = (unsigned int)v;
	}
	return 0;
}

static const char *reg_name(unsigned int i)
{
	static const char *const n[] = { "eax", "ebx", "ecx", "edx" };

	return n[i];
}

int vmig__config_check_host(struct json_object *o, struct vmig_err *err)
{
	struct json_object *feats;
	struct kvm_cpuid2 *c = NULL;
	char missing[400] = "";
	size_t i, n, len = 0;
	int ret;

	if (!json_object_object_get_ex(o, "cpuid", &feats) ||
	    !json_object_is_type(feats, json_type_array))
		return 0;   /* an older source: nothing to compare */
	ret = read_supported_cpuid(&c);
	if (ret) {
		vmig_err_set(err, ret, "cannot read this host's CPU features from /dev/kvm: %s",
			     strerror(-ret));
		return ret;
	}
	n = json_object_array_length(feats);
	for (i = 0; i < n; i++) {
		struct json_object *a = json_object_array_get_idx(feats, i);
		const struct kvm_cpuid_entry2 *e;
		uint64_t v[6];
		unsigned int k;

		if (!a || !json_object_is_type(a, json_type_array) ||
		    json_object_array_length(a) != 6)
			continue;
		for (k = 0; k < 6; k++)
			v[k] = json_object_get_uint64(json_object_array_get_idx(a, k));
		/* Only feature registers: leaf 0xd.1 eax, 7.0 ebx/ecx/edx, 1 and
		 * 0x80000001 ecx/edx. */
		e = find_leaf(c, (uint32_t)v[0], (uint32_t)v[1]);
		for (k = 0; k < 4; k++) {
			uint32_t want = (uint32_t)v[2 + k], have;
			bool feature_reg =
				(v[0] == 1 && (k == 2 || k == 3)) ||
				(v[0] == 7 && k >= 1) ||
				(v[0] == 0xd && k == 0) ||
				(v[0] == 0x80000001 && (k == 2 || k == 3));

			if (!feature_reg)
				continue;
			have = e ? (k == 0 ? e->eax : k == 1 ? e->ebx : k == 2 ? e->ecx : e->edx) : 0;
			if (v[0] == 1 && k == 3)
				have |= 1u << 28;   /* HTT: vmig sets it itself */
			if (want & ~have && len < sizeof(missing) - 64)
				len += snprintf(missing + len, sizeof(missing) - len,
						"%sleaf 0x%" PRIx64 ".%" PRIu64 " %s bits 0x%08x",
						len ? ", " : "", v[0], v[1], reg_name(k), want & ~have);
		}
	}
	free(c);
	if (len) {
		vmig_err_set(err, -ENOTSUP, "this host lacks CPU features the VM may use: %s",
			     missing);
		return -ENOTSUP;
	}
	return 0;
}
