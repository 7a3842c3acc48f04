/*
 * vmig evacuate, the plan: which VM goes to which target.
 *
 * Each target is asked for `vmig host-info --json` over SSH (one thread
 * per target, so that a slow host costs its own timeout only, not the
 * sum).  A target is usable if it answered, is not drained, runs KVM,
 * offers every CPU feature bit that KVM offers guests here (a guest may
 * use any of them; the destination would refuse the VM otherwise, but
 * only after the evacuation had started), and does not already run a VM
 * of the same name.
 *
 * Placement reserves each VM's whole memory on its target (guest RAM is
 * touched lazily, but a guest may touch all of it): VMs are taken largest
 * first, each onto the usable target with the most memory left (spreading
 * the load); if that leaves one without a place, the same again onto the
 * target with the least memory left that fits (packing, which fits more).
 * If neither places every VM, the plan is refused with the reason, and
 * nothing has moved.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "vmig/util.h"
#include "cli.h"
#include "evacuate.h"

/* The longest host-info answer taken. */
#define HOST_INFO_MAX (1u << 20)

static bool jbool(struct json_object *o, const char *key)
{
	struct json_object *v;

	return o && json_object_object_get_ex(o, key, &v) && json_object_get_boolean(v);
}

/* ------------------------------------------------------------------------
 * Targets
 */

int evac_parse_targets(const char *list, struct evac_plan *plan)
{
	char *copy = strdup(list), *tok, *save = NULL;
	struct evac_target *t;
	struct vmig_uri u;
	unsigned int i;

	if (!copy) {
		cli_error("out of memory");
		return VMIG_EXIT_ERROR;
	}
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		struct vmig_err err = { 0 };

		while (*tok == ' ')
			tok++;
		if (!*tok)
			continue;
		t = realloc(plan->targets, (plan->nr_targets + 1) * sizeof(*t));
		if (!t) {
			free(copy);
			cli_error("out of memory");
			return VMIG_EXIT_ERROR;
		}
		plan->targets = t;
		t = &plan->targets[plan->nr_targets];
		memset(t, 0, sizeof(*t));
		if (!strncmp(tok, "ssh://", 6))
			snprintf(t->uri, sizeof(t->uri), "%s", tok);
		else
			snprintf(t->uri, sizeof(t->uri), "ssh://%s", tok);
		if (vmig_transport_parse_uri(t->uri, &u, &err) < 0 || u.kind != VMIG_URI_SSH) {
			free(copy);
			return cli_usage_error("evacuate", "bad target '%s': %s", tok,
					       err.msg[0] ? err.msg : "expected [USER@]HOST[:PORT]");
		}
		if (strchr(u.host, ':'))
			snprintf(t->label, sizeof(t->label), "[%s]", u.host);
		else
			snprintf(t->label, sizeof(t->label), "%s", u.host);
		if (u.port != 22) {
			size_t l = strlen(t->label);

			snprintf(t->label + l, sizeof(t->label) - l, ":%u", u.port);
		}
		for (i = 0; i < plan->nr_targets; i++)
			if (!strcmp(plan->targets[i].uri, t->uri)) {
				free(copy);
				return cli_usage_error("evacuate", "target '%s' is named twice", tok);
			}
		plan->nr_targets++;
	}
	free(copy);
	if (!plan->nr_targets)
		return cli_usage_error("evacuate", "--to names no target host");
	return 0;
}

struct query {
	struct evac_target *t;
	const struct vmig_ssh_options *ssh;
	int timeout_ms;
	pthread_t thread;
	bool started;
};

static void *query_one(void *arg)
{
	struct query *q = arg;
	struct evac_target *t = q->t;
	struct vmig_err err = { 0 };
	char *out = NULL;
	int ret;

	ret = vmig_ssh_exec(t->uri, q->ssh, "host-info --json", q->timeout_ms, HOST_INFO_MAX,
			    &out, &err);
	if (ret) {
		snprintf(t->error, sizeof(t->error), "no host-info: %s",
			 err.msg[0] ? err.msg : strerror(-ret));
		return NULL;
	}
	t->info = json_tokener_parse(out);
	if (!t->info || !json_object_is_type(t->info, json_type_object) ||
	    !json_object_object_get_ex(t->info, "free_memory_bytes", NULL)) {
		json_object_put(t->info);
		t->info = NULL;
		snprintf(t->error, sizeof(t->error), "'vmig host-info --json' there printed no "
			 "host information (an older vmig? got '%.80s')", out);
	} else {
		t->free_bytes = ju64(t->info, "free_memory_bytes");
	}
	free(out);
	return NULL;
}

void evac_query_targets(struct evac_plan *plan, const struct vmig_ssh_options *ssh,
			int timeout_ms)
{
	struct query *q = calloc(plan->nr_targets, sizeof(*q));
	unsigned int i;

	if (!q) {
		for (i = 0; i < plan->nr_targets; i++)
			snprintf(plan->targets[i].error, sizeof(plan->targets[i].error),
				 "out of memory");
		return;
	}
	for (i = 0; i < plan->nr_targets; i++) {
		q[i].t = &plan->targets[i];
		q[i].ssh = ssh;
		q[i].timeout_ms = timeout_ms;
		q[i].started = pthread_create(&q[i].thread, NULL, query_one, &q[i]) == 0;
		if (!q[i].started)
			query_one(&q[i]);
	}
	for (i = 0; i < plan->nr_targets; i++)
		if (q[i].started)
			pthread_join(q[i].thread, NULL);
	free(q);
}

/* ------------------------------------------------------------------------
 * Usability
 */

static const char *reg_name(unsigned int k)
{
	return k == 0 ? "eax" : k == 1 ? "ebx" : k == 2 ? "ecx" : "edx";
}

static struct json_object *find_leaf(struct json_object *arr, uint64_t fn, uint64_t idx)
{
	size_t i, n = arr ? json_object_array_length(arr) : 0;

	for (i = 0; i < n; i++) {
		struct json_object *a = json_object_array_get_idx(arr, i);

		if (a && json_object_is_type(a, json_type_array) &&
		    json_object_array_length(a) == 6 &&
		    json_object_get_uint64(json_object_array_get_idx(a, 0)) == fn &&
		    json_object_get_uint64(json_object_array_get_idx(a, 1)) == idx)
			return a;
	}
	return NULL;
}

/*
 * The CPU feature bits KVM offers guests here that @dst's KVM does not,
 * as text in @buf ("" if none).  The registers compared are the feature
 * registers of the migration stream's check (migrate/config.c).
 */
static void cpu_missing(struct json_object *self, struct json_object *dst, char *buf, size_t len)
{
	struct json_object *mine = NULL, *theirs = NULL;
	size_t i, n, pos = 0;

	buf[0] = '\0';
	if (!json_object_object_get_ex(self, "kvm_cpuid", &mine))
		return;
	if (!json_object_object_get_ex(dst, "kvm_cpuid", &theirs))
		return;        /* an older vmig: the destination still checks */
	n = json_object_array_length(mine);
	for (i = 0; i < n; i++) {
		struct json_object *a = json_object_array_get_idx(mine, i), *b;
		uint64_t fn, idx;
		unsigned int k;

		if (!a || json_object_array_length(a) != 6)
			continue;
		fn = json_object_get_uint64(json_object_array_get_idx(a, 0));
		idx = json_object_get_uint64(json_object_array_get_idx(a, 1));
		b = find_leaf(theirs, fn, idx);
		for (k = 0; k < 4; k++) {
			uint32_t want = (uint32_t)json_object_get_uint64(
				json_object_array_get_idx(a, 2 + k));
			uint32_t have = b ? (uint32_t)json_object_get_uint64(
				json_object_array_get_idx(b, 2 + k)) : 0;
			bool feature_reg = (fn == 1 && k >= 2) || (fn == 7 && k >= 1) ||
					   (fn == 0xd && k == 0) || (fn == 0x80000001 && k >= 2);

			if (!feature_reg || !(want & ~have) || pos + 64 >= len)
				continue;
			pos += (size_t)snprintf(buf + pos, len - pos, "%sleaf 0x%" PRIx64 ".%" PRIu64
						" %s bits 0x%08x", pos ? ", " : "", fn, idx,
						reg_name(k), want & ~have);
		}
	}
}

/* Whether @t cannot take any VM; the reason goes to t->error. */
static bool target_unusable(struct evac_plan *plan, struct evac_target *t)
{
	struct json_object *d;
	char missing[400];

	if (t->error[0])
		return true;
	if (jbool(t->info, "drained")) {
		json_object_object_get_ex(t->info, "drain", &d);
		snprintf(t->error, sizeof(t->error), "drained (%s since %s): it takes no VMs",
			 jstr(d, "by", "drain mark"), jstr(d, "since_text", "?"));
		return true;
	}
	if (json_object_object_get_ex(t->info, "kvm", &d) && !json_object_get_boolean(d)) {
		snprintf(t->error, sizeof(t->error), "no usable /dev/kvm there");
		return true;
	}
	cpu_missing(plan->self, t->info, missing, sizeof(missing));
	if (missing[0]) {
		snprintf(t->error, sizeof(t->error), "lacks CPU features guests here may use: %s",
			 missing);
		return true;
	}
	return false;
}

static bool runs_vm(const struct evac_target *t, const char *name)
{
	struct json_object *vms;
	size_t i, n;

	if (!json_object_object_get_ex(t->info, "vms", &vms))
		return false;
	n = json_object_array_length(vms);
	for (i = 0; i < n; i++)
		if (!strcmp(jstr(json_object_array_get_idx(vms, i), "name", ""), name))
			return true;
	return false;
}

/* ------------------------------------------------------------------------
 * Placement
 */

static int cmp_size_desc(const void *a, const void *b, void *arg)
{
	const struct evac_vm *vms = arg;
	const struct evac_vm *x = &vms[*(const unsigned int *)a], *y = &vms[*(const unsigned int *)b];

	if (x->memory != y->memory)
		return x->memory > y->memory ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* One pass: @spread picks the target with most left, else least. */
static bool place_pass(struct evac_plan *plan, const unsigned int *by_size, const bool *usable,
		       bool spread)
{
	unsigned int i, k;
	bool all = true;

	for (k = 0; k < plan->nr_targets; k++) {
		plan->targets[k].planned_bytes = 0;
		plan->targets[k].planned_vms = 0;
	}
	for (i = 0; i < plan->nr_vms; i++) {
		struct evac_vm *vm = &plan->vms[by_size[i]];
		int best = -1;
		uint64_t best_left = 0;

		for (k = 0; k < plan->nr_targets; k++) {
			struct evac_target *t = &plan->targets[k];
			uint64_t left = t->free_bytes > t->planned_bytes ?
					t->free_bytes - t->planned_bytes : 0;

			if (!usable[k] || left < vm->memory || runs_vm(t, vm->name))
				continue;
			if (best < 0 || (spread ? left > best_left : left < best_left)) {
				best = (int)k;
				best_left = left;
			}
		}
		vm->target = best;
		if (best < 0) {
			all = false;
			continue;
		}
		plan->targets[best].planned_bytes += vm->memory;
		plan->targets[best].planned_vms++;
	}
	return all;
}

int evac_place(struct evac_plan *plan, char *why, size_t len)
{
	unsigned int *by_size = calloc(plan->nr_vms ? plan->nr_vms : 1, sizeof(*by_size));
	bool *usable = calloc(plan->nr_targets, sizeof(*usable));
	uint64_t need = 0, offered = 0;
	unsigned int i, k, nr_usable = 0;
	size_t pos = 0;
	char a[32], b[32];
	int ret = 0;

#define SAY(...) do { if (pos < len) pos += (size_t)snprintf(why + pos, len - pos, __VA_ARGS__); } while (0)
	why[0] = '\0';
	if (!by_size || !usable) {
		free(by_size);
		free(usable);
		snprintf(why, len, "out of memory");
		return -ENOMEM;
	}
	for (k = 0; k < plan->nr_targets; k++) {
		usable[k] = !target_unusable(plan, &plan->targets[k]);
		if (usable[k]) {
			nr_usable++;
			offered += plan->targets[k].free_bytes;
		}
	}
	for (i = 0; i < plan->nr_vms; i++) {
		by_size[i] = i;
		need += plan->vms[i].memory;
	}
	qsort_r(by_size, plan->nr_vms, sizeof(*by_size), cmp_size_desc, plan->vms);
	if (!place_pass(plan, by_size, usable, true) &&
	    !place_pass(plan, by_size, usable, false)) {
		ret = -ENOSPC;
		vmig_size_format(need, a, sizeof(a));
		vmig_size_format(offered, b, sizeof(b));
		SAY("the plan does not fit: the VMs need %s, the usable targets (%u of %u) "
		    "have %s free\n", a, nr_usable, plan->nr_targets, b);
		for (i = 0; i < plan->nr_vms; i++) {
			const struct evac_vm *vm = &plan->vms[by_size[i]];

			if (vm->target >= 0)
				continue;
			vmig_size_format(vm->memory, a, sizeof(a));
			SAY("  VM '%s' (%s) fits on no target", vm->name, a);
			for (k = 0; k < plan->nr_targets; k++)
				if (usable[k] && runs_vm(&plan->targets[k], vm->name))
					SAY("; %s already runs a VM named '%s'",
					    plan->targets[k].label, vm->name);
			SAY("\n");
		}
		for (k = 0; k < plan->nr_targets; k++) {
			const struct evac_target *t = &plan->targets[k];

			if (!usable[k]) {
				SAY("  target %s: %s\n", t->label, t->error);
				continue;
			}
			vmig_size_format(t->free_bytes, a, sizeof(a));
			vmig_size_format(t->free_bytes - t->planned_bytes, b, sizeof(b));
			SAY("  target %s: %s free, %s left after the %u VM%s placed there\n",
			    t->label, a, b, t->planned_vms, t->planned_vms == 1 ? "" : "s");
		}
		if (pos && why[pos < len ? pos - 1 : len - 2] == '\n')
			why[pos < len ? pos - 1 : len - 2] = '\0';
	}
#undef SAY
	free(by_size);
	free(usable);
	return ret;
}

/* ------------------------------------------------------------------------
 * Showing it
 */

void evac_plan_print(const struct evac_plan *plan, FILE *f)
{
	unsigned int i, k;
	char mem[32], a[32], b[32];

	fprintf(f, "%3s  %-20s %10s %5s  %s\n", "#", "VM", "MEMORY", "VCPUS", "TARGET");
	for (i = 0; i < plan->nr_vms; i++) {
		const struct evac_vm *vm = &plan->vms[i];

		vmig_size_format(vm->memory, mem, sizeof(mem));
		fprintf(f, "%3u  %-20s %10s %5u  %s\n", i + 1, vm->name, mem, vm->vcpus,
			vm->target >= 0 ? plan->targets[vm->target].label : "-");
	}
	fprintf(f, "Targets:\n");
	for (k = 0; k < plan->nr_targets; k++) {
		const struct evac_target *t = &plan->targets[k];

		if (t->error[0]) {
			fprintf(f, "  %-24s unusable: %s\n", t->label, t->error);
			continue;
		}
		vmig_size_format(t->free_bytes, a, sizeof(a));
		vmig_size_format(t->planned_bytes, mem, sizeof(mem));
		vmig_size_format(t->free_bytes - t->planned_bytes, b, sizeof(b));
		fprintf(f, "  %-24s %s free, %u VM%s planned (%s), %s left; host %s, vmig %s\n",
			t->label, a, t->planned_vms, t->planned_vms == 1 ? "" : "s", mem, b,
			jstr(t->info, "hostname", "?"), jstr(t->info, "vmig_version", "?"));
	}
}

struct json_object *evac_plan_json(const struct evac_plan *plan)
{
	struct json_object *o = json_object_new_object(), *vms, *targets;
	unsigned int i, k;

	vms = json_object_new_array();
	for (i = 0; i < plan->nr_vms; i++) {
		const struct evac_vm *vm = &plan->vms[i];
		struct json_object *e = json_object_new_object();

		json_object_object_add(e, "name", json_object_new_string(vm->name));
		json_object_object_add(e, "memory", json_object_new_uint64(vm->memory));
		json_object_object_add(e, "vcpus", json_object_new_int((int)vm->vcpus));
		json_object_object_add(e, "target", vm->target >= 0 ?
			json_object_new_string(plan->targets[vm->target].uri) : NULL);
		json_object_array_add(vms, e);
	}
	json_object_object_add(o, "vms", vms);
	targets = json_object_new_array();
	for (k = 0; k < plan->nr_targets; k++) {
		const struct evac_target *t = &plan->targets[k];
		struct json_object *e = json_object_new_object();

		json_object_object_add(e, "uri", json_object_new_string(t->uri));
		json_object_object_add(e, "hostname", json_object_new_string(
			jstr(t->info, "hostname", "")));
		json_object_object_add(e, "usable", json_object_new_boolean(!t->error[0]));
		if (t->error[0])
			json_object_object_add(e, "error", json_object_new_string(t->error));
		json_object_object_add(e, "free_memory_bytes", json_object_new_uint64(t->free_bytes));
		json_object_object_add(e, "planned_bytes", json_object_new_uint64(t->planned_bytes));
		json_object_object_add(e, "planned_vms", json_object_new_int((int)t->planned_vms));
		json_object_array_add(targets, e);
	}
	json_object_object_add(o, "targets", targets);
	return o;
}

void evac_plan_fini(struct evac_plan *plan)
{
	unsigned int k;

	for (k = 0; k < plan->nr_targets; k++)
		json_object_put(plan->targets[k].info);
	free(plan->targets);
	free(plan->vms);
	json_object_put(plan->self);
	memset(plan, 0, sizeof(*plan));
}
