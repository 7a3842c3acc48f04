/*
 * vmig host-info: what this host offers to VMs (free memory, CPUs and
 * the CPU features KVM gives guests, vmig's version, the VMs already
 * here) and its drain mark.  `vmig evacuate` runs `vmig host-info --json`
 * on each target through SSH to plan where VMs go.
 *
 * The drain mark is a file, RUN_DIR/drain, holding a small JSON object
 * (since, pid, by, reason).  While it exists, `vmig run`, `vmig incoming`
 * and `vmig restore` refuse to start or receive a VM here
 * (cli_drain_check()), so nothing lands on a host that is being emptied.
 * `vmig evacuate` sets it; `vmig host-info --undrain` removes it,
 * `--drain` sets it by hand.  It lives in the run directory, which is a
 * tmpfs (/run) on most systems: a reboot clears it.
 *
 * Free memory is MemAvailable from /proc/meminfo.  Test hook: the
 * environment variable VMIG_TEST_FREE_MEMORY=SIZE replaces it, so that
 * tests on one machine can give two "hosts" different amounts.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/kvm.h>
#include <json-c/json.h>

#include "vmig/util.h"
#include "cli.h"
#include "evacuate.h"

#define JSON_FLAGS (JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)

/* ------------------------------------------------------------------------
 * The drain mark
 */

static int drain_path(char *buf, size_t len)
{
	char dir[4096];
	int ret = vmig_rundir_get(dir, sizeof(dir));

	if (ret < 0)
		return ret;
	return vmig_rundir_path(dir, EVAC_DRAIN_FILE, NULL, buf, len);
}

/* The mark's contents, or NULL if there is none (or it cannot be read). */
static struct json_object *drain_read(bool *present)
{
	char path[4200], buf[4096];
	ssize_t n;
	int fd;

	*present = false;
	if (drain_path(path, sizeof(path)) < 0)
		return NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	*present = true;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return json_tokener_parse(buf);   /* NULL if not JSON: still a mark */
}

int cli_drain_check(char *msg, size_t len)
{
	struct json_object *d;
	bool present;

	d = drain_read(&present);
	if (!present)
		return 0;
	snprintf(msg, len, "this host is being drained for maintenance (%s%s%s%s%s): it takes "
		 "no VMs until 'vmig host-info --undrain'",
		 d ? jstr(d, "by", "drain mark") : "drain mark",
		 d ? ", since " : "", d ? jstr(d, "since_text", "?") : "",
		 d && *jstr(d, "reason", "") ? ": " : "", d ? jstr(d, "reason", "") : "");
	json_object_put(d);
	return -EBUSY;
}

int evac_drain_set(const char *by, const char *reason, bool *created)
{
	struct json_object *o;
	char path[4200], tmp[4300], dir[4096], when[64];
	time_t now = time(NULL);
	struct tm tm;
	const char *text;
	bool present;
	int fd, ret;

	json_object_put(drain_read(&present));
	if (created)
		*created = !present;
	if (vmig_rundir_get(dir, sizeof(dir)) < 0 || vmig_rundir_ensure(dir) < 0 ||
	    drain_path(path, sizeof(path)) < 0) {
		cli_error("no usable run directory for the drain mark: set VMIG_RUN_DIR or "
			  "XDG_RUNTIME_DIR");
		return -ENOENT;
	}
	gmtime_r(&now, &tm);
	strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S UTC", &tm);
	o = json_object_new_object();
	json_object_object_add(o, "since", json_object_new_int64((int64_t)now));
	json_object_object_add(o, "since_text", json_object_new_string(when));
	json_object_object_add(o, "pid", json_object_new_int((int)getpid()));
	json_object_object_add(o, "by", json_object_new_string(by));
	json_object_object_add(o, "reason", json_object_new_string(reason ? reason : ""));
	text = json_object_to_json_string_ext(o, JSON_FLAGS);
	/* Written beside and renamed: a reader never sees half a mark. */
	snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
	ret = 0;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = -errno;
	} else {
		errno = 0;   /* a short write sets none */
		if (write(fd, text, strlen(text)) != (ssize_t)strlen(text) ||
		    write(fd, "\n", 1) != 1)
			ret = errno ? -errno : -EIO;
		if (close(fd) < 0 && !ret)
			ret = -errno;
		if (!ret && rename(tmp, path) < 0)
			ret = -errno;
		if (ret)
			unlink(tmp);
	}
	if (ret)
		cli_error("cannot write the drain mark %s: %s", path, strerror(-ret));
	json_object_put(o);
	return ret;
}

int evac_drain_clear(void)
{
	char path[4200];

	if (drain_path(path, sizeof(path)) < 0) {
		cli_error("no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return -ENOENT;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		int ret = -errno;

		cli_error("cannot remove the drain mark %s: %s", path, strerror(-ret));
		return ret;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * What the host offers
 */

static int cmp_status_name(const void *a, const void *b)
{
	struct json_object *x = *(struct json_object *const *)a;
	struct json_object *y = *(struct json_object *const *)b;

	return strcmp(jstr(x, "name", ""), jstr(y, "name", ""));
}

int evac_local_vms(struct json_object **out)
{
	struct json_object *arr = json_object_new_array();
	char dir[4096], path[8192];
	struct dirent *de;
	DIR *d;

	*out = NULL;
	if (!arr)
		return -ENOMEM;
	if (vmig_rundir_get(dir, sizeof(dir)) < 0) {
		cli_error("no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		json_object_put(arr);
		return -ENOENT;
	}
	d = opendir(dir);
	if (!d && errno != ENOENT) {
		int ret = -errno;

		cli_error("cannot read the run directory %s: %s", dir, strerror(-ret));
		json_object_put(arr);
		return ret;
	}
	while (d && (de = readdir(d))) {
		struct json_object *reply = NULL;
		size_t len = strlen(de->d_name);

		if (len < 6 || strcmp(de->d_name + len - 5, ".sock"))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if (vmig_ctl_call(path, vmig_ctl_request("status"), &reply) < 0 ||
		    vmig_ctl_reply_status(reply, NULL) < 0) {
			json_object_put(reply);
			continue;   /* a VMM that died, or one that is going */
		}
		if (!strcmp(jstr(reply, "state", ""), "waiting")) {
			json_object_put(reply);
			continue;   /* a vmig incoming with no VM yet */
		}
		json_object_object_del(reply, "ok");
		json_object_array_add(arr, reply);
	}
	if (d)
		closedir(d);
	json_object_array_sort(arr, cmp_status_name);
	*out = arr;
	return 0;
}

/* MemTotal and MemAvailable, in bytes. */
static void meminfo(uint64_t *total, uint64_t *avail)
{
	FILE *f = fopen("/proc/meminfo", "re");
	char line[256];
	unsigned long long kb;

	*total = *avail = 0;
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
			*total = kb * 1024;
		else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
			*avail = kb * 1024;
	}
	fclose(f);
}

/* The model name and the flags of the first CPU in /proc/cpuinfo. */
static void cpuinfo(struct json_object *o)
{
	FILE *f = fopen("/proc/cpuinfo", "re");
	struct json_object *flags = json_object_new_array();
	char *line = NULL, *p, *tok, *save;
	size_t cap = 0;
	bool have_model = false, have_flags = false;

	while (f && getline(&line, &cap, f) > 0 && !(have_model && have_flags)) {
		line[strcspn(line, "\n")] = '\0';
		p = strchr(line, ':');
		if (!p)
			continue;
		if (!have_model && !strncmp(line, "model name", 10)) {
			json_object_object_add(o, "cpu_model", json_object_new_string(p + 2 <= line +
				strlen(line) ? p + 2 : ""));
			have_model = true;
		} else if (!have_flags && !strncmp(line, "flags", 5)) {
			for (tok = strtok_r(p + 1, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save))
				json_object_array_add(flags, json_object_new_string(tok));
			have_flags = true;
		}
	}
	free(line);
	if (f)
		fclose(f);
	json_object_object_add(o, "cpu_flags", flags);
}

/*
 * The CPUID feature leaves KVM offers guests here, as the migration
 * stream's configuration carries them ([function, index, eax, ebx, ecx,
 * edx]): a VM may use any of these bits, so a target must offer them.
 */
static struct json_object *kvm_cpuid(void)
{
	static const struct { uint32_t fn, idx; } leaves[] = {
		{ 0x1, 0 }, { 0x7, 0 }, { 0xd, 1 }, { 0x80000001, 0 },
	};
	struct json_object *arr = NULL;
	struct kvm_cpuid2 *c = NULL;
	unsigned int nent, i, k;
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return NULL;
	for (nent = 64; nent <= 4096; nent *= 2) {
		c = calloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));
		if (!c)
			break;
		c->nent = nent;
		if (ioctl(fd, KVM_GET_SUPPORTED_CPUID, c) == 0)
			break;
		free(c);
		c = NULL;
		if (errno != E2BIG)
			break;
	}
	close(fd);
	if (!c)
		return NULL;
	arr = json_object_new_array();
	for (i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
		for (k = 0; k < c->nent; k++) {
			const struct kvm_cpuid_entry2 *e = &c->entries[k];
			struct json_object *a;

			if (e->function != leaves[i].fn ||
			    (e->index != leaves[i].idx &&
			     (e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)))
				continue;
			a = json_object_new_array();
			json_object_array_add(a, json_object_new_uint64(leaves[i].fn));
			json_object_array_add(a, json_object_new_uint64(leaves[i].idx));
			json_object_array_add(a, json_object_new_uint64(e->eax));
			json_object_array_add(a, json_object_new_uint64(e->ebx));
			json_object_array_add(a, json_object_new_uint64(e->ecx));
			json_object_array_add(a, json_object_new_uint64(e->edx));
			json_object_array_add(arr, a);
			break;
		}
	}
	free(c);
	return arr;
}

struct json_object *evac_host_info(void)
{
	struct json_object *o = json_object_new_object(), *vms = NULL, *names, *d, *cpuid;
	const char *test_free = getenv("VMIG_TEST_FREE_MEMORY");
	uint64_t total, avail, free_bytes, vm_bytes = 0;
	char host[256] = "", dir[4096] = "";
	bool drained;
	size_t i;
	long n;

	if (!o)
		return NULL;
	gethostname(host, sizeof(host) - 1);
	vmig_rundir_get(dir, sizeof(dir));
	json_object_object_add(o, "hostname", json_object_new_string(host));
	json_object_object_add(o, "vmig_version", json_object_new_string(PACKAGE_VERSION));
	json_object_object_add(o, "run_dir", json_object_new_string(dir));

	meminfo(&total, &avail);
	free_bytes = avail;
	if (test_free && *test_free) {
		if (vmig_size_parse(test_free, &free_bytes) < 0) {
			cli_error("bad VMIG_TEST_FREE_MEMORY '%s': give a size such as 512M",
				  test_free);
			json_object_put(o);
			return NULL;
		}
	}
	json_object_object_add(o, "memory_total_bytes", json_object_new_uint64(total));
	json_object_object_add(o, "memory_available_bytes", json_object_new_uint64(avail));
	json_object_object_add(o, "free_memory_bytes", json_object_new_uint64(free_bytes));
	json_object_object_add(o, "free_memory_source", json_object_new_string(
		test_free && *test_free ? "VMIG_TEST_FREE_MEMORY" : "MemAvailable"));

	n = sysconf(_SC_NPROCESSORS_ONLN);
	json_object_object_add(o, "cpus", json_object_new_int(n > 0 ? (int)n : 1));
	cpuinfo(o);
	cpuid = kvm_cpuid();
	json_object_object_add(o, "kvm", json_object_new_boolean(cpuid != NULL));
	if (cpuid)
		json_object_object_add(o, "kvm_cpuid", cpuid);

	d = drain_read(&drained);
	json_object_object_add(o, "drained", json_object_new_boolean(drained));
	if (drained)
		json_object_object_add(o, "drain", d ? d : json_object_new_object());

	if (evac_local_vms(&vms) < 0) {
		json_object_put(o);
		return NULL;
	}
	names = json_object_new_array();
	for (i = 0; i < json_object_array_length(vms); i++) {
		struct json_object *v = json_object_array_get_idx(vms, i), *e;

		e = json_object_new_object();
		json_object_object_add(e, "name", json_object_new_string(jstr(v, "name", "?")));
		json_object_object_add(e, "state", json_object_new_string(jstr(v, "state", "?")));
		json_object_object_add(e, "memory", json_object_new_uint64(ju64(v, "memory")));
		json_object_object_add(e, "vcpus", json_object_new_uint64(ju64(v, "vcpus")));
		json_object_array_add(names, e);
		vm_bytes += ju64(v, "memory");
	}
	json_object_put(vms);
	json_object_object_add(o, "vm_memory_bytes", json_object_new_uint64(vm_bytes));
	json_object_object_add(o, "vms", names);
	return o;
}

static void print_info(struct json_object *o)
{
	struct json_object *v, *vms;
	char free_s[32], total_s[32], vm_s[32];
	size_t i, n;

	vmig_size_format(ju64(o, "free_memory_bytes"), free_s, sizeof(free_s));
	vmig_size_format(ju64(o, "memory_total_bytes"), total_s, sizeof(total_s));
	vmig_size_format(ju64(o, "vm_memory_bytes"), vm_s, sizeof(vm_s));
	printf("host:     %s\n", jstr(o, "hostname", "?"));
	printf("vmig:     %s\n", jstr(o, "vmig_version", "?"));
	printf("run dir:  %s\n", jstr(o, "run_dir", "?"));
	printf("cpus:     %s (%s)\n", jstr(o, "cpus", "?"), jstr(o, "cpu_model", "unknown model"));
	printf("kvm:      %s\n", json_object_object_get_ex(o, "kvm", &v) &&
	       json_object_get_boolean(v) ? "yes" : "no (/dev/kvm cannot be opened)");
	printf("memory:   %s free of %s%s\n", free_s, total_s,
	       strcmp(jstr(o, "free_memory_source", ""), "MemAvailable") ?
	       " (VMIG_TEST_FREE_MEMORY)" : "");
	vms = json_object_object_get_ex(o, "vms", &v) ? v : NULL;
	n = vms ? json_object_array_length(vms) : 0;
	printf("vms:      %zu, %s of guest memory", n, vm_s);
	for (i = 0; i < n; i++)
		printf("%s%s", i ? ", " : ": ",
		       jstr(json_object_array_get_idx(vms, i), "name", "?"));
	printf("\n");
	if (json_object_object_get_ex(o, "drain", &v))
		printf("drained:  yes, %s since %s%s%s; 'vmig host-info --undrain' ends it\n",
		       jstr(v, "by", "?"), jstr(v, "since_text", "?"),
		       *jstr(v, "reason", "") ? ": " : "", jstr(v, "reason", ""));
	else
		printf("drained:  no\n");
}

int cmd_host_info(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json",    no_argument,       NULL, 'j' },
		{ "undrain", no_argument,       NULL, 'u' },
		{ "drain",   optional_argument, NULL, 'd' },
		{ "help",    no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *reason = NULL;
	bool json = false, undrain = false, drain = false;
	struct json_object *o;
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "jh", longopts, NULL)) != -1) {
		switch (c) {
		case 'j':
			json = true;
			break;
		case 'u':
			undrain = true;
			break;
		case 'd':
			drain = true;
			reason = optarg;
			break;
		case 'h':
			printf("Usage: vmig host-info [--json] [--undrain | --drain[=REASON]]\n\n"
			       "Show what this host offers to VMs: free memory, CPUs and the CPU\n"
			       "features KVM gives guests, vmig's version, the VMs running here, and\n"
			       "whether the host is drained ('vmig evacuate' drains it: 'vmig run' and\n"
			       "incoming migrations are refused until --undrain).\n\n"
			       "  -j, --json        print one JSON object\n"
			       "      --undrain     remove the drain mark: the host takes VMs again\n"
			       "      --drain[=REASON]  set the drain mark by hand\n");
			return VMIG_EXIT_OK;
		default:
			return cli_usage_error("host-info", "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind != argc)
		return cli_usage_error("host-info", "too many arguments");
	if (drain && undrain)
		return cli_usage_error("host-info", "--drain and --undrain exclude each other");
	if (undrain) {
		if (evac_drain_clear() < 0)
			return VMIG_EXIT_ERROR;
		if (!json)
			printf("drain mark removed: this host takes VMs again\n");
	}
	if (drain) {
		if (evac_drain_set("vmig host-info --drain", reason, NULL) < 0)
			return VMIG_EXIT_ERROR;
		if (!json)
			printf("drain mark set: 'vmig run' and incoming migrations are refused "
			       "here until 'vmig host-info --undrain'\n");
	}
	if ((undrain || drain) && !json)
		return VMIG_EXIT_OK;
	o = evac_host_info();
	if (!o)
		return VMIG_EXIT_ERROR;
	if (json)
		printf("%s\n", json_object_to_json_string_ext(o, JSON_FLAGS));
	else
		print_info(o);
	json_object_put(o);
	return VMIG_EXIT_OK;
}
