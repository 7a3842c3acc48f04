/*
 * The libvirt procedures vmig serves, each on its call's thread.
 *
 * A libvirt "domain" is a vmig VM of the run directory (NAME.sock answers
 * its control protocol), a persistent definition in the config directory
 * (NAME.xml, see "Persistent definitions"), or both.  Nothing is cached:
 * every call asks the VMs (status, pause, resume, stop, migrate, cancel)
 * and reads the definitions, so what virsh shows is what `vmig status`
 * shows; the one exception is the job statistics of a migration this
 * endpoint runs, answered from its progress events (the VMM's control
 * thread is busy while the migration connects).  Identity: the name; the
 * id is the VMM's pid (-1 when not running); the UUID is the definition's,
 * else derived from the name (the same on every host, so a VM keeps it
 * across a migration unless renamed).
 *
 * Peer-to-peer migration (migrate-perform3-params with
 * VIR_MIGRATE_PEER2PEER) becomes one `migrate` request to the VM: the
 * destination URI vmig+ssh://[USER@]HOST[:PORT]/... becomes
 * ssh://[USER@]HOST[:PORT], or the migrate_uri parameter names a
 * `vmig incoming --listen` directly (tcp:// or unix:).  The call blocks
 * until the migration's result, like libvirt's; meanwhile other calls on
 * the connection (job stats, abort) are served on their own threads.
 *
 * What vmig cannot do is refused with libvirt's own error codes, never
 * ignored: VIR_ERR_NO_SUPPORT for procedures we do not serve,
 * VIR_ERR_ARGUMENT_UNSUPPORTED for flags and parameters we cannot honour.
 */
#include "config.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include "vmig/migrate.h"
#include "vmig/util.h"
#include "vmig/vm.h"
#include "libvirt-internal.h"

/* Procedure numbers: libvirt's, for the procedures we serve. */
enum {
	P_CONNECT_OPEN = 1,
	P_CONNECT_CLOSE = 2,
	P_CONNECT_GET_TYPE = 3,
	P_CONNECT_GET_VERSION = 4,
	P_CONNECT_GET_MAX_VCPUS = 5,
	P_NODE_GET_INFO = 6,
	P_CONNECT_GET_CAPABILITIES = 7,
	P_DOMAIN_CREATE = 9,
	P_DOMAIN_CREATE_XML = 10,
	P_DOMAIN_DEFINE_XML = 11,
	P_DOMAIN_DESTROY = 12,
	P_DOMAIN_GET_XML_DESC = 14,
	P_DOMAIN_GET_AUTOSTART = 15,
	P_DOMAIN_GET_INFO = 16,
	P_DOMAIN_GET_MAX_MEMORY = 17,
	P_DOMAIN_GET_MAX_VCPUS = 18,
	P_DOMAIN_GET_OS_TYPE = 19,
	P_CONNECT_LIST_DEFINED_DOMAINS = 21,
	P_DOMAIN_LOOKUP_BY_ID = 22,
	P_DOMAIN_LOOKUP_BY_NAME = 23,
	P_DOMAIN_LOOKUP_BY_UUID = 24,
	P_CONNECT_NUM_OF_DEFINED_DOMAINS = 25,
	P_DOMAIN_RESUME = 28,
	P_DOMAIN_SHUTDOWN = 33,
	P_DOMAIN_SUSPEND = 34,
	P_DOMAIN_UNDEFINE = 35,
	P_CONNECT_LIST_DOMAINS = 37,
	P_CONNECT_NUM_OF_DOMAINS = 51,
	P_CONNECT_GET_HOSTNAME = 59,
	P_CONNECT_SUPPORTS_FEATURE = 60,
	P_AUTH_LIST = 66,
	P_CONNECT_GET_URI = 110,
	P_CONNECT_IS_SECURE = 149,
	P_DOMAIN_IS_ACTIVE = 150,
	P_DOMAIN_IS_PERSISTENT = 151,
	P_CONNECT_GET_LIB_VERSION = 157,
	P_DOMAIN_GET_JOB_INFO = 163,
	P_DOMAIN_ABORT_JOB = 164,
	P_DOMAIN_MIGRATE_SET_MAX_DOWNTIME = 166,
	P_DOMAIN_HAS_MANAGED_SAVE_IMAGE = 183,
	P_DOMAIN_CREATE_WITH_FLAGS = 196,
	P_DOMAIN_GET_VCPUS_FLAGS = 200,
	P_DOMAIN_IS_UPDATED = 202,
	P_DOMAIN_MIGRATE_SET_MAX_SPEED = 207,
	P_DOMAIN_GET_STATE = 212,
	P_DOMAIN_GET_CONTROL_INFO = 229,
	P_DOMAIN_UNDEFINE_FLAGS = 231,
	P_DOMAIN_DESTROY_FLAGS = 234,
	P_DOMAIN_MIGRATE_GET_MAX_SPEED = 242,
	P_DOMAIN_SHUTDOWN_FLAGS = 258,
	P_CONNECT_LIST_ALL_DOMAINS = 273,
	P_DOMAIN_GET_JOB_STATS = 298,
	P_DOMAIN_MIGRATE_PERFORM3_PARAMS = 305,
	P_DOMAIN_DEFINE_XML_FLAGS = 350,
};

/* Driver features (libvirt's virDrvFeature numbers) and our answers. */
enum {
	F_MIGRATION_V2 = 3,
	F_MIGRATION_P2P = 4,
	F_MIGRATION_V3 = 6,
	F_TYPED_PARAM_STRING = 9,
	F_PROGRAM_KEEPALIVE = 10,
	F_MIGRATION_PARAMS = 13,
};

#define XML_NS "https://vmig.dev/xmlns/libvirt/domain/1"

#define ARGS(ok) do { if (!(ok)) return bad_args(c); } while (0)
#define REPLY(ok) do { if (!(ok)) return vmig__lv_fail(c, VIR_ERR_RPC, \
	"the reply does not fit in %u bytes", LV_REPLY_MAX); } while (0)

static int bad_args(struct lv_call *c)
{
	return vmig__lv_fail(c, VIR_ERR_RPC, "cannot decode the arguments of %s "
			     "(procedure %d): malformed or truncated",
			     vmig__lv_proc_name(c->hdr.proc), c->hdr.proc);
}

/* ------------------------------------------------------------------------
 * The VMs
 */

static int vm_sock(struct lv_server *s, const char *name, char *buf, size_t len)
{
	if (vmig_vm_name_valid(name) < 0)
		return -EINVAL;
	return vmig_rundir_path(s->run_dir, name, "sock", buf, len);
}

/*
 * Send {"cmd": @cmd} (or @req, consumed, if not NULL) to VM @name.
 * 0 with the reply; -ENOENT if no such VM runs; else -errno with the
 * VM's message in @msg.
 */
static int vm_call(struct lv_server *s, const char *name, const char *cmd,
		   struct json_object *req, struct json_object **reply, char *msg, size_t len)
{
	char path[4200];
	const char *m = NULL;
	int ret;

	*reply = NULL;
	if (msg)
		msg[0] = 0;
	if (vm_sock(s, name, path, sizeof(path)) < 0) {
		json_object_put(req);
		return -ENOENT;
	}
	ret = vmig_ctl_call(path, req ? req : vmig_ctl_request(cmd), reply);
	if (ret == -ENOENT || ret == -ECONNREFUSED)
		return -ENOENT;
	if (ret < 0) {
		if (msg)
			snprintf(msg, len, "cannot talk to VM '%s': %s", name, strerror(-ret));
		return ret;
	}
	ret = vmig_ctl_reply_status(*reply, &m);
	if (ret < 0) {
		if (msg)
			snprintf(msg, len, "%s", m ? m : strerror(-ret));
		json_object_put(*reply);
		*reply = NULL;
	}
	return ret;
}

static int vm_status(struct lv_server *s, const char *name, struct json_object **st)
{
	int ret = vm_call(s, name, "status", NULL, st, NULL, 0);

	/* A vmig incoming still waiting for its VM (vmig-incoming(1)): no domain yet. */
	if (ret >= 0 && !strcmp(jstr(*st, "state", ""), "waiting")) {
		json_object_put(*st);
		*st = NULL;
		return -ENOENT;
	}
	return ret;
}

/* vm_status(), but -ETIMEDOUT if no reply comes within @timeout_ms (the
 * VMM's control thread may be busy setting up a migration). */
static int vm_status_within(struct lv_server *s, const char *name, int timeout_ms,
			    struct json_object **st)
{
	struct vmig_ctl_reader rd;
	struct json_object *req;
	struct pollfd pfd;
	char path[4200];
	int fd, ret;

	*st = NULL;
	if (vm_sock(s, name, path, sizeof(path)) < 0 || vmig_ctl_connect(path, &fd) < 0)
		return -ENOENT;
	req = vmig_ctl_request("status");
	ret = req ? vmig_ctl_send(fd, req) : -ENOMEM;
	json_object_put(req);
	if (ret < 0) {
		close(fd);
		return ret == -EPIPE ? -ENOENT : ret;
	}
	pfd = (struct pollfd){ .fd = fd, .events = POLLIN };
	do
		ret = poll(&pfd, 1, timeout_ms);
	while (ret < 0 && errno == EINTR);
	if (ret == 0) {
		close(fd);
		return -ETIMEDOUT;
	}
	vmig_ctl_reader_init(&rd, fd);
	ret = vmig_ctl_recv(&rd, st);
	vmig_ctl_reader_fini(&rd);
	close(fd);
	if (ret < 0)
		return -ENOENT;
	ret = vmig_ctl_reply_status(*st, NULL);
	if (ret < 0) {
		json_object_put(*st);
		*st = NULL;
	}
	return ret;
}

/*
 * migrate-set-max-speed while the VM migrates: its VMM's set-bandwidth.
 * Best effort: no migration (ENOENT) or a VMM busy connecting is fine,
 * the setting applies to the next migration anyway.
 */
static void set_running_bandwidth(struct lv_server *s, const char *name, uint64_t bps)
{
	struct vmig_ctl_reader rd;
	struct json_object *req, *reply = NULL;
	struct pollfd pfd;
	char path[4200];
	int fd, ret;

	if (vm_sock(s, name, path, sizeof(path)) < 0 || vmig_ctl_connect(path, &fd) < 0)
		return;
	req = vmig_ctl_request("set-bandwidth");
	if (req)
		json_object_object_add(req, "bandwidth_bps", json_object_new_int64(
			bps > INT64_MAX ? INT64_MAX : (int64_t)bps));
	ret = req ? vmig_ctl_send(fd, req) : -ENOMEM;
	json_object_put(req);
	pfd = (struct pollfd){ .fd = fd, .events = POLLIN };
	if (ret == 0 && poll(&pfd, 1, 1000) > 0) {
		vmig_ctl_reader_init(&rd, fd);
		if (vmig_ctl_recv(&rd, &reply) == 0 && vmig_ctl_reply_status(reply, NULL) == 0)
			vmig_log(VMIG_LOG_INFO, "libvirt: %s: the running migration now goes at "
				 "most %" PRIu64 " bytes/s", name, bps);
		json_object_put(reply);
		vmig_ctl_reader_fini(&rd);
	}
	close(fd);
}

/* A UUID derived from the name (version 8, "custom"): stable everywhere. */
static void name_uuid(const char *name, unsigned char uuid[16])
{
	uint64_t h1 = 0xcbf29ce484222325ull, h2 = 0x84222325cbf29ce4ull;
	const char *p;

	for (p = "vmig:"; *p; p++) {
		h1 = (h1 ^ (unsigned char)*p) * 0x100000001b3ull;
		h2 = (h2 ^ (unsigned char)*p) * 0x100000001b3ull;
	}
	for (p = name; *p; p++) {
		h1 = (h1 ^ (unsigned char)*p) * 0x100000001b3ull;
		h2 = ((h2 ^ (unsigned char)*p) * 0x100000001b3ull) ^ (h1 >> 29);
	}
	memcpy(uuid, &h1, 8);
	memcpy(uuid + 8, &h2, 8);
	uuid[6] = (uuid[6] & 0x0f) | 0x80;
	uuid[8] = (uuid[8] & 0x3f) | 0x80;
}

static void uuid_format(const unsigned char u[16], char out[37])
{
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
		 "%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7],
		 u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

static bool vm_active(struct json_object *st)
{
	return strcmp(jstr(st, "state", "stopped"), "stopped") != 0;
}

/* libvirt's state and reason for a VM's status. */
static void vm_state(struct json_object *st, int *state, int *reason)
{
	const char *s = jstr(st, "state", "");
	struct json_object *m;
	bool migrating = false;

	if (json_object_object_get_ex(st, "migration", &m)) {
		const char *ms = jstr(m, "status", "");

		migrating = !strcmp(ms, "setup") || !strcmp(ms, "active") ||
			    !strcmp(ms, "switchover");
	}
	if (!strcmp(s, "running")) {
		*state = VIR_DOMAIN_RUNNING;
		*reason = VIR_DOMAIN_RUNNING_UNKNOWN;
	} else if (!strcmp(s, "paused")) {
		*state = VIR_DOMAIN_PAUSED;
		*reason = migrating ? VIR_DOMAIN_PAUSED_MIGRATION : VIR_DOMAIN_PAUSED_USER;
	} else if (!strcmp(s, "handoff-uncertain")) {
		*state = VIR_DOMAIN_PAUSED;
		*reason = VIR_DOMAIN_PAUSED_UNKNOWN;
	} else if (!strcmp(s, "stopped")) {
		*state = VIR_DOMAIN_SHUTOFF;
		*reason = VIR_DOMAIN_SHUTOFF_UNKNOWN;
	} else {
		*state = VIR_DOMAIN_NOSTATE;
		*reason = 0;
	}
}

static void st_uuid(struct json_object *st, const char *name, unsigned char u[16]);

/* The domain of status @st (from dom_status()). */
static void vm_domain(struct json_object *st, const char *name, struct lv_domain *d)
{
	d->name = (char *)name;
	st_uuid(st, name, d->uuid);
	d->id = vm_active(st) ? (int32_t)ju64(st, "pid") : -1;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Add to @names the VM names of @dir's files named NAME@suffix. */
static int scan_dir(const char *dir, const char *suffix, char ***names, size_t *n,
		    size_t *cap)
{
	size_t slen = strlen(suffix);
	struct dirent *de;
	DIR *d = opendir(dir);

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);
		char *name;

		if (len <= slen || strcmp(de->d_name + len - slen, suffix))
			continue;
		name = strndup(de->d_name, len - slen);
		if (!name || vmig_vm_name_valid(name) < 0) {
			free(name);
			continue;
		}
		if (*n == *cap) {
			char **nn = realloc(*names, (*cap = *cap ? *cap * 2 : 16) * sizeof(*nn));

			if (!nn) {
				free(name);
				break;
			}
			*names = nn;
		}
		(*names)[(*n)++] = name;
	}
	closedir(d);
	return 0;
}

/* The names of the domains, sorted: the VMs with a socket in the run
 * directory and the definitions in the config directory. */
static int list_names(struct lv_server *s, char ***out, size_t *n)
{
	char **names = NULL;
	size_t cap = 0, i, j;
	int ret;

	*n = 0;
	*out = NULL;
	ret = scan_dir(s->run_dir, ".sock", &names, n, &cap);
	if (ret == 0)
		ret = scan_dir(s->config_dir, ".xml", &names, n, &cap);
	if (ret < 0) {
		for (i = 0; i < *n; i++)
			free(names[i]);
		free(names);
		*n = 0;
		return ret;
	}
	if (*n)
		qsort(names, *n, sizeof(*names), cmp_str);
	/* A defined VM that runs is there twice. */
	for (i = j = 0; i < *n; i++) {
		if (j && !strcmp(names[j - 1], names[i]))
			free(names[i]);
		else
			names[j++] = names[i];
	}
	*n = j;
	*out = names;
	return 0;
}

static void free_names(char **names, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* ------------------------------------------------------------------------
 * Reading domain XML
 */

/* XML-unescape @s (the five predefined entities and &#N;/&#xN;) in place. */
static void xml_unescape(char *s)
{
	static const struct { const char *e; char c; } ents[] = {
		{ "&amp;", '&' }, { "&lt;", '<' }, { "&gt;", '>' }, { "&apos;", '\'' },
		{ "&quot;", '"' },
	};
	char *o = s;
	size_t i;

	while (*s) {
		bool done = false;

		if (*s == '&') {
			for (i = 0; i < sizeof(ents) / sizeof(ents[0]) && !done; i++) {
				size_t n = strlen(ents[i].e);

				if (!strncmp(s, ents[i].e, n)) {
					*o++ = ents[i].c;
					s += n;
					done = true;
				}
			}
			if (!done && s[1] == '#') {
				char *end;
				unsigned long v = s[2] == 'x' ? strtoul(s + 3, &end, 16) :
						  strtoul(s + 2, &end, 10);

				if (*end == ';' && v > 0 && v < 128) {
					*o++ = (char)v;
					s = end + 1;
					done = true;
				}
			}
		}
		if (!done)
			*o++ = *s++;
	}
	*o = 0;
}

/*
 * The text of the first element named @name (local name, any prefix) after
 * @from in @xml, unescaped, in @out; its attributes in @attrs.  A small
 * reader for the few elements vmig takes from domain XML, not a general
 * XML parser: comments and CDATA are not understood.  Returns 0, -ENOENT,
 * or -EINVAL for a malformed or over-long element.
 */
static int xml_elem(const char *xml, const char *name, char *out, size_t len,
		    char *attrs, size_t alen)
{
	const char *p = xml;
	size_t n = strlen(name);

	while ((p = strchr(p, '<'))) {
		const char *tag = p + 1, *colon, *gt, *end, *local = tag;

		p++;
		if (*tag == '/' || *tag == '!' || *tag == '?')
			continue;
		gt = strchr(tag, '>');
		if (!gt)
			return -EINVAL;
		colon = memchr(tag, ':', (size_t)(strcspn(tag, " \t\r\n/>")));
		if (colon)
			local = colon + 1;
		if (strncmp(local, name, n) || !strchr(" \t\r\n/>", local[n]))
			continue;
		if (attrs) {
			size_t a = (size_t)(gt - (local + n));

			if (a >= alen)
				return -EINVAL;
			memcpy(attrs, local + n, a);
			attrs[a] = 0;
		}
		if (gt[-1] == '/') {              /* <name/> */
			out[0] = 0;
			return 0;
		}
		end = strchr(gt + 1, '<');
		if (!end || (size_t)(end - gt - 1) >= len)
			return -EINVAL;
		memcpy(out, gt + 1, (size_t)(end - gt - 1));
		out[end - gt - 1] = 0;
		xml_unescape(out);
		return 0;
	}
	return -ENOENT;
}

/* The value of attribute @name in @attrs ("" if absent). */
static void xml_attr(const char *attrs, const char *name, char *out, size_t len)
{
	const char *p = attrs;
	size_t n = strlen(name);

	out[0] = 0;
	while ((p = strstr(p, name))) {
		const char *q = p + n;
		char quote;
		const char *end;

		if ((p != attrs && !strchr(" \t\r\n", p[-1])) || (*q != '=')) {
			p += n;
			continue;
		}
		quote = q[1];
		if (quote != '\'' && quote != '"')
			return;
		end = strchr(q + 2, quote);
		if (!end || (size_t)(end - q - 2) >= len)
			return;
		memcpy(out, q + 2, (size_t)(end - q - 2));
		out[end - q - 2] = 0;
		return;
	}
}

/* libvirt's memory units to bytes per unit; 0 if unknown. */
static uint64_t unit_bytes(const char *u)
{
	static const struct { const char *u; uint64_t b; } units[] = {
		{ "", 1024 }, { "b", 1 }, { "bytes", 1 }, { "KB", 1000 }, { "k", 1024 },
		{ "KiB", 1024 }, { "MB", 1000000 }, { "M", 1048576 }, { "MiB", 1048576 },
		{ "GB", 1000000000 }, { "G", 1073741824 }, { "GiB", 1073741824 },
		{ "TB", 1000000000000ull }, { "T", 1099511627776ull },
		{ "TiB", 1099511627776ull },
	};
	size_t i;

	for (i = 0; i < sizeof(units) / sizeof(units[0]); i++)
		if (!strcmp(u, units[i].u))
			return units[i].b;
	return 0;
}

/* ------------------------------------------------------------------------
 * Domain XML: what vmig takes from it
 */

/* What a domain's XML asks for, as `vmig run` arguments. */
struct dom_spec {
	char name[128];
	char mem_arg[32];           /* "NK" */
	uint64_t mem_kib;
	char vcpus[16];
	char kernel[1024], initrd[1024], cmdline[2048], workload[256];
	bool has_uuid;
	unsigned char uuid[16];
};

/* Parse a UUID as libvirt does: 32 hex digits, dashes anywhere, blanks
 * around.  0 or -EINVAL. */
static int uuid_parse(const char *s, unsigned char u[16])
{
	unsigned int i = 0;

	while (isspace((unsigned char)*s))
		s++;
	for (; *s && !isspace((unsigned char)*s); s++) {
		int v;

		if (*s == '-')
			continue;
		if (!isxdigit((unsigned char)*s) || i == 32)
			return -EINVAL;
		v = isdigit((unsigned char)*s) ? *s - '0' : tolower((unsigned char)*s) - 'a' + 10;
		if (i % 2 == 0)
			u[i / 2] = (unsigned char)(v << 4);
		else
			u[i / 2] |= (unsigned char)v;
		i++;
	}
	while (isspace((unsigned char)*s))
		s++;
	return i == 32 && !*s ? 0 : -EINVAL;
}

/*
 * Read what vmig takes from domain XML @xml into @sp: 0, or a libvirt
 * error code with the reason in @msg.  create-xml and define-xml take the
 * same XML, so a definition starts as `virsh create` would have.
 */
static int parse_spec(const char *xml, struct dom_spec *sp, char *msg, size_t len)
{
	char mem[64], attrs[256], unit[16], uuid[80];
	uint64_t ub, amount;
	unsigned long v;
	char *end;
	int ret;

	memset(sp, 0, sizeof(*sp));
	snprintf(sp->vcpus, sizeof(sp->vcpus), "1");
	if (xml_elem(xml, "domain", sp->name, sizeof(sp->name), attrs, sizeof(attrs)) == -ENOENT) {
		snprintf(msg, len, "no <domain> element");
		return VIR_ERR_XML_ERROR;
	}
	if (strstr(xml, "<disk") || strstr(xml, "<interface") || strstr(xml, "<hostdev")) {
		snprintf(msg, len, "vmig VMs have no disks, network interfaces or host devices: "
			 "remove them from the XML");
		return VIR_ERR_ARGUMENT_UNSUPPORTED;
	}
	if (xml_elem(xml, "name", sp->name, sizeof(sp->name), NULL, 0) < 0 ||
	    vmig_vm_name_valid(sp->name) < 0) {
		snprintf(msg, len, "a <name> of 1-64 letters, digits, '.', '_' or '-' is needed");
		return VIR_ERR_XML_ERROR;
	}
	ret = xml_elem(xml, "uuid", uuid, sizeof(uuid), NULL, 0);
	if (ret == -EINVAL || (ret == 0 && uuid_parse(uuid, sp->uuid) < 0)) {
		snprintf(msg, len, "bad <uuid>: give 32 hex digits, as in "
			 "01234567-89ab-cdef-0123-456789abcdef");
		return VIR_ERR_XML_ERROR;
	}
	sp->has_uuid = ret == 0;
	if (xml_elem(xml, "memory", mem, sizeof(mem), attrs, sizeof(attrs)) < 0) {
		snprintf(msg, len, "a <memory> element is needed");
		return VIR_ERR_XML_ERROR;
	}
	xml_attr(attrs, "unit", unit, sizeof(unit));
	ub = unit_bytes(unit);
	errno = 0;
	amount = strtoull(mem, &end, 10);
	if (!ub || errno || end == mem || *end || amount > UINT64_MAX / ub / 2) {
		snprintf(msg, len, "bad <memory unit='%s'>%s</memory>", unit, mem);
		return VIR_ERR_XML_ERROR;
	}
	sp->mem_kib = (amount * ub + 1023) / 1024;
	snprintf(sp->mem_arg, sizeof(sp->mem_arg), "%" PRIu64 "K", sp->mem_kib);
	ret = xml_elem(xml, "vcpu", sp->vcpus, sizeof(sp->vcpus), NULL, 0);
	errno = 0;
	v = strtoul(sp->vcpus, &end, 10);
	if (ret == -EINVAL || errno || end == sp->vcpus || *end || v < 1 ||
	    v > VMIG_VM_MAX_VCPUS) {
		snprintf(msg, len, "bad <vcpu>: give a number from 1 to %u", VMIG_VM_MAX_VCPUS);
		return VIR_ERR_XML_ERROR;
	}
	xml_elem(xml, "kernel", sp->kernel, sizeof(sp->kernel), NULL, 0);
	xml_elem(xml, "initrd", sp->initrd, sizeof(sp->initrd), NULL, 0);
	xml_elem(xml, "cmdline", sp->cmdline, sizeof(sp->cmdline), NULL, 0);
	if (strstr(xml, XML_NS))
		xml_elem(strstr(xml, XML_NS), "workload", sp->workload, sizeof(sp->workload),
			 NULL, 0);
	if ((sp->initrd[0] || sp->cmdline[0]) && !sp->kernel[0]) {
		snprintf(msg, len, "<initrd> and <cmdline> need a <kernel>");
		return VIR_ERR_XML_ERROR;
	}
	if ((sp->kernel[0] && sp->kernel[0] != '/') || (sp->initrd[0] && sp->initrd[0] != '/')) {
		snprintf(msg, len, "<kernel> and <initrd> must be absolute paths");
		return VIR_ERR_XML_ERROR;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Persistent definitions (virsh define)
 *
 * One file per domain, CONFIG_DIR/NAME.xml: the XML as defined, with a
 * <uuid> added when it had none (the UUID the name gives a transient VM,
 * so a running VM keeps its UUID when undefined).  Like the VMs, they are
 * read at every call, never cached; srv->defs_lock makes "is the name or
 * UUID free?" and the define, undefine, start or create that follows one
 * step.  A domain is the union: a definition with no VM running is
 * "shut off"; a VM with no definition is transient.
 */

/* Largest definition: its XML must fit a dumpxml reply. */
#define DEF_XML_MAX (LV_REPLY_MAX - 4096)

static int def_path(struct lv_server *s, const char *name, char *buf, size_t len)
{
	int n;

	if (vmig_vm_name_valid(name) < 0)
		return -EINVAL;
	n = snprintf(buf, len, "%s/%s.xml", s->config_dir, name);
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/* The XML of definition @name in *@xml (free()): 0, -ENOENT, or -errno. */
static int def_read(struct lv_server *s, const char *name, char **xml)
{
	char path[4200], *buf;
	size_t len = 0;
	ssize_t n;
	int fd, ret = 0;

	*xml = NULL;
	if (def_path(s, name, path, sizeof(path)) < 0)
		return -ENOENT;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	buf = malloc(DEF_XML_MAX + 1);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	while (len < DEF_XML_MAX + 1) {
		n = read(fd, buf + len, DEF_XML_MAX + 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			ret = -errno;
			break;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (!ret && len > DEF_XML_MAX)
		ret = -EFBIG;
	if (ret) {
		free(buf);
		return ret;
	}
	buf[len] = 0;
	*xml = buf;
	return 0;
}

static void fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

/* Write definition @name atomically: a temporary file, fsync, rename, and
 * the directory synced, so that a crash leaves the old file or the new
 * one.  0 or -errno. */
static int def_write(struct lv_server *s, const char *name, const char *xml)
{
	char path[4200], tmp[4300];
	size_t len = strlen(xml), off = 0;
	int fd, ret = 0;

	if (def_path(s, name, path, sizeof(path)) < 0)
		return -EINVAL;
	snprintf(tmp, sizeof(tmp), "%s/.%s.xml.%ld.tmp", s->config_dir, name, (long)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	while (off < len) {
		ssize_t n = write(fd, xml + off, len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			ret = -errno;
			break;
		}
		off += (size_t)n;
	}
	if (!ret && fsync(fd) < 0)
		ret = -errno;
	if (close(fd) < 0 && !ret)
		ret = -errno;
	if (!ret && rename(tmp, path) < 0)
		ret = -errno;
	if (ret) {
		unlink(tmp);
		return ret;
	}
	fsync_dir(s->config_dir);
	return 0;
}

/* The UUID of domain status @st (dom_status() puts it there). */
static void st_uuid(struct json_object *st, const char *name, unsigned char u[16])
{
	const char *s = jstr(st, "lv_uuid", NULL);

	if (!s || uuid_parse(s, u) < 0)
		name_uuid(name, u);
}

static bool st_persistent(struct json_object *st)
{
	struct json_object *v;

	return json_object_object_get_ex(st, "lv_persistent", &v) && json_object_get_boolean(v);
}

/*
 * Domain @name: its VM's status if it runs, else one made from its
 * definition ("state": "stopped", memory and vcpus as defined); either
 * way with "lv_persistent" and "lv_uuid" added.  0, or -ENOENT if there
 * is neither VM nor definition.
 */
static int dom_status(struct lv_server *s, const char *name, struct json_object **st)
{
	char *xml = NULL, msg[256], uuid[37];
	struct dom_spec sp;
	bool defined = def_read(s, name, &xml) == 0, parsed = false;
	unsigned char u[16];

	if (defined) {
		parsed = parse_spec(xml, &sp, msg, sizeof(msg)) == 0;
		if (!parsed)
			vmig_log(VMIG_LOG_WARN, "libvirt: the definition of '%s' in %s is "
				 "broken: %s", name, s->config_dir, msg);
	}
	free(xml);
	if (vm_status(s, name, st) < 0) {
		if (!defined)
			return -ENOENT;
		*st = json_object_new_object();
		if (!*st)
			return -ENOMEM;
		json_object_object_add(*st, "state", json_object_new_string("stopped"));
		json_object_object_add(*st, "memory", json_object_new_uint64(
			parsed ? sp.mem_kib * 1024 : 0));
		json_object_object_add(*st, "vcpus", json_object_new_uint64(
			parsed ? strtoul(sp.vcpus, NULL, 10) : 0));
	}
	if (parsed && sp.has_uuid)
		memcpy(u, sp.uuid, 16);
	else
		name_uuid(name, u);
	uuid_format(u, uuid);
	json_object_object_add(*st, "lv_uuid", json_object_new_string(uuid));
	json_object_object_add(*st, "lv_persistent", json_object_new_boolean(defined));
	return 0;
}

/* Is @u the UUID of a domain other than @name?  Its name in @other. */
static bool uuid_taken(struct lv_server *s, const unsigned char u[16], const char *name,
		       char *other, size_t len)
{
	char **names;
	size_t n, i;
	bool taken = false;

	if (list_names(s, &names, &n) < 0)
		return false;
	for (i = 0; i < n && !taken; i++) {
		struct json_object *st;
		unsigned char v[16];

		if (!strcmp(names[i], name) || dom_status(s, names[i], &st) < 0)
			continue;
		st_uuid(st, names[i], v);
		if (!memcmp(u, v, 16)) {
			taken = true;
			snprintf(other, len, "%s", names[i]);
		}
		json_object_put(st);
	}
	free_names(names, n);
	return taken;
}

/* @xml with "<uuid>@u</uuid>" added after the <name> element, where
 * libvirt puts it (else after the <domain> start tag); free(), or NULL. */
static char *xml_add_uuid(const char *xml, const unsigned char u[16])
{
	const char *dom = strstr(xml, "<domain"), *gt = dom ? strchr(dom, '>') : NULL;
	const char *name_end = gt ? strstr(gt, "</name>") : NULL;
	char uuid[37], *out;
	size_t head;

	if (!gt)
		return NULL;
	if (name_end)
		gt = name_end + strlen("</name>") - 1;
	uuid_format(u, uuid);
	head = (size_t)(gt + 1 - xml);
	out = malloc(strlen(xml) + 64);
	if (!out)
		return NULL;
	memcpy(out, xml, head);
	sprintf(out + head, "\n  <uuid>%s</uuid>%s", uuid, gt + 1);
	return out;
}

/* Decode a domain argument and fetch its status (dom_status()): 0, or -1
 * with VIR_ERR_NO_DOMAIN. */
static int arg_domain(struct lv_call *c, struct lv_domain *d, struct json_object **st)
{
	memset(d, 0, sizeof(*d));
	if (!vmig__lv_xdr_domain(&c->in, d)) {
		vmig__lv_domain_fini(d);
		return bad_args(c);
	}
	if (dom_status(c->srv, d->name, st) < 0) {
		vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "no VM named '%s' runs in %s or is "
			      "defined in %s", d->name, c->srv->run_dir, c->srv->config_dir);
		vmig__lv_domain_fini(d);
		return -1;
	}
	return 0;
}

#define WITH_DOMAIN(extra_args)                                                  \
	struct lv_domain dom;                                                    \
	struct json_object *st = NULL;                                           \
	if (arg_domain(c, &dom, &st) < 0)                                        \
		return -1;                                                       \
	if (!(extra_args)) {                                                     \
		json_object_put(st);                                             \
		vmig__lv_domain_fini(&dom);                                      \
		return bad_args(c);                                              \
	}

#define DONE(ret) do { json_object_put(st); vmig__lv_domain_fini(&dom); return (ret); } while (0)

/* ------------------------------------------------------------------------
 * Connection procedures
 */

static int p_connect_open(struct lv_call *c)
{
	char *name = NULL;
	u_int flags;

	ARGS(vmig__lv_xdr_opt_string(&c->in, &name) && xdr_u_int(&c->in, &flags));
	if (name && *name && strncmp(name, "vmig:", 5)) {
		vmig__lv_fail(c, VIR_ERR_NO_CONNECT, "this endpoint serves vmig:///system, not "
			      "'%s' (connect with vmig+unix:///system?socket=PATH)", name);
		free(name);
		return -1;
	}
	vmig_log(VMIG_LOG_INFO, "libvirt: a client opened %s", name ? name : "(default)");
	free(name);
	return 0;
}

static int p_connect_close(struct lv_call *c)
{
	c->close_after = true;
	return 0;
}

static int reply_string(struct lv_call *c, const char *s)
{
	char *p = (char *)s;

	REPLY(vmig__lv_xdr_string(&c->out, &p));
	return 0;
}

static int reply_int(struct lv_call *c, int v)
{
	REPLY(xdr_int(&c->out, &v));
	return 0;
}

static int reply_u64(struct lv_call *c, uint64_t v)
{
	REPLY(xdr_uint64_t(&c->out, &v));
	return 0;
}

static int p_get_type(struct lv_call *c)
{
	return reply_string(c, "vmig");
}

static uint64_t version_number(const char *v)
{
	unsigned int a = 0, b = 0, d = 0;

	sscanf(v, "%u.%u.%u", &a, &b, &d);
	return (uint64_t)a * 1000000 + b * 1000 + d;
}

static int p_get_version(struct lv_call *c)
{
	return reply_u64(c, version_number(PACKAGE_VERSION));
}

/* The libvirt protocol level served: that of the libvirt we were built
 * against (9.0.0 on Debian 12). */
static int p_get_lib_version(struct lv_call *c)
{
	return reply_u64(c, LIBVIR_VERSION_NUMBER);
}

static int p_get_hostname(struct lv_call *c)
{
	char host[256];

	if (gethostname(host, sizeof(host)) < 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = 0;
	return reply_string(c, host);
}

static int p_get_uri(struct lv_call *c)
{
	return reply_string(c, c->srv->uri);
}

static int p_get_max_vcpus(struct lv_call *c)
{
	char *type = NULL;

	ARGS(vmig__lv_xdr_opt_string(&c->in, &type));
	free(type);
	return reply_int(c, 32);
}

static int p_supports_feature(struct lv_call *c)
{
	int feature, yes;

	ARGS(xdr_int(&c->in, &feature));
	yes = feature == F_MIGRATION_P2P || feature == F_MIGRATION_V3 ||
	      feature == F_TYPED_PARAM_STRING || feature == F_PROGRAM_KEEPALIVE ||
	      feature == F_MIGRATION_PARAMS;
	return reply_int(c, yes);
}

static int p_auth_list(struct lv_call *c)
{
	u_int n = 0;   /* no authentication: the socket's mode says who connects */

	REPLY(xdr_u_int(&c->out, &n));
	return 0;
}

static int p_is_secure(struct lv_call *c)
{
	return reply_int(c, 1);   /* a local unix socket, or ssh to one */
}

static void host_uuid(char out[37])
{
	char id[64] = "";
	unsigned char u[16];
	FILE *f = fopen("/etc/machine-id", "re");
	unsigned int i;

	if (f) {
		if (!fgets(id, sizeof(id), f))
			id[0] = 0;
		fclose(f);
	}
	memset(u, 0, sizeof(u));
	for (i = 0; i < 16 && isxdigit((unsigned char)id[2 * i]) &&
	     isxdigit((unsigned char)id[2 * i + 1]); i++) {
		char b[3] = { id[2 * i], id[2 * i + 1], 0 };

		u[i] = (unsigned char)strtoul(b, NULL, 16);
	}
	uuid_format(u, out);
}

static int p_get_capabilities(struct lv_call *c)
{
	char xml[2048], uuid[37];

	host_uuid(uuid);
	snprintf(xml, sizeof(xml),
		 "<capabilities>\n"
		 "  <host>\n"
		 "    <uuid>%s</uuid>\n"
		 "    <cpu>\n"
		 "      <arch>x86_64</arch>\n"
		 "    </cpu>\n"
		 "    <migration_features>\n"
		 "      <live/>\n"
		 "      <uri_transports>\n"
		 "        <uri_transport>ssh</uri_transport>\n"
		 "        <uri_transport>tcp</uri_transport>\n"
		 "      </uri_transports>\n"
		 "    </migration_features>\n"
		 "  </host>\n"
		 "  <guest>\n"
		 "    <os_type>hvm</os_type>\n"
		 "    <arch name='x86_64'>\n"
		 "      <wordsize>64</wordsize>\n"
		 "      <emulator>vmig</emulator>\n"
		 "      <domain type='kvm'/>\n"
		 "    </arch>\n"
		 "  </guest>\n"
		 "</capabilities>\n", uuid);
	return reply_string(c, xml);
}

static int p_node_get_info(struct lv_call *c)
{
	char model[32] = "x86_64";
	long cpus = sysconf(_SC_NPROCESSORS_ONLN), pages = sysconf(_SC_PHYS_PAGES);
	uint64_t mem_kib = (uint64_t)(pages > 0 ? pages : 0) * (uint64_t)sysconf(_SC_PAGESIZE) / 1024;
	int ncpus = cpus > 0 ? (int)cpus : 1, mhz = 0, one = 1;

	REPLY(xdr_vector(&c->out, model, 32, sizeof(char), (xdrproc_t)xdr_char) &&
	      xdr_uint64_t(&c->out, &mem_kib) && xdr_int(&c->out, &ncpus) &&
	      xdr_int(&c->out, &mhz) && xdr_int(&c->out, &one) && xdr_int(&c->out, &one) &&
	      xdr_int(&c->out, &ncpus) && xdr_int(&c->out, &one));
	return 0;
}

/* ------------------------------------------------------------------------
 * Listing and lookup
 */

/* Does VM @st pass list-all-domains' @flags? */
static bool list_filter(struct json_object *st, unsigned int flags)
{
	int state, reason;
	bool active = vm_active(st);

	vm_state(st, &state, &reason);
#define GROUP(a, b, va, vb) \
	if ((flags & ((a) | (b))) && !((flags & (a) && (va)) || (flags & (b) && (vb)))) \
		return false;
	GROUP(VIR_CONNECT_LIST_DOMAINS_ACTIVE, VIR_CONNECT_LIST_DOMAINS_INACTIVE, active, !active);
	GROUP(VIR_CONNECT_LIST_DOMAINS_PERSISTENT, VIR_CONNECT_LIST_DOMAINS_TRANSIENT,
	      st_persistent(st), !st_persistent(st));
	GROUP(VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE, VIR_CONNECT_LIST_DOMAINS_NO_MANAGEDSAVE,
	      false, true);
	GROUP(VIR_CONNECT_LIST_DOMAINS_AUTOSTART, VIR_CONNECT_LIST_DOMAINS_NO_AUTOSTART,
	      false, true);
	GROUP(VIR_CONNECT_LIST_DOMAINS_HAS_SNAPSHOT, VIR_CONNECT_LIST_DOMAINS_NO_SNAPSHOT,
	      false, true);
	GROUP(VIR_CONNECT_LIST_DOMAINS_HAS_CHECKPOINT, VIR_CONNECT_LIST_DOMAINS_NO_CHECKPOINT,
	      false, true);
#undef GROUP
	if (flags & (VIR_CONNECT_LIST_DOMAINS_RUNNING | VIR_CONNECT_LIST_DOMAINS_PAUSED |
		     VIR_CONNECT_LIST_DOMAINS_SHUTOFF | VIR_CONNECT_LIST_DOMAINS_OTHER)) {
		bool ok = (flags & VIR_CONNECT_LIST_DOMAINS_RUNNING && state == VIR_DOMAIN_RUNNING) ||
			  (flags & VIR_CONNECT_LIST_DOMAINS_PAUSED && state == VIR_DOMAIN_PAUSED) ||
			  (flags & VIR_CONNECT_LIST_DOMAINS_SHUTOFF && state == VIR_DOMAIN_SHUTOFF) ||
			  (flags & VIR_CONNECT_LIST_DOMAINS_OTHER && state != VIR_DOMAIN_RUNNING &&
			   state != VIR_DOMAIN_PAUSED && state != VIR_DOMAIN_SHUTOFF);

		if (!ok)
			return false;
	}
	return true;
}

static int p_list_all_domains(struct lv_call *c)
{
	int need_results;
	u_int flags, count = 0, i;
	char **names;
	size_t n, all;
	struct json_object **sts;
	bool ok = true;
	int ret;

	ARGS(xdr_int(&c->in, &need_results) && xdr_u_int(&c->in, &flags));
	ret = list_names(c->srv, &names, &all);
	if (ret < 0)
		return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot read the run "
				     "directory %s: %s", c->srv->run_dir, strerror(-ret));
	n = all < LV_DOMAINS_MAX ? all : LV_DOMAINS_MAX;
	sts = calloc(n ? n : 1, sizeof(*sts));
	if (!sts) {
		free_names(names, all);
		return vmig__lv_fail(c, VIR_ERR_NO_MEMORY, "out of memory");
	}
	for (i = 0; i < n; i++) {
		if (dom_status(c->srv, names[i], &sts[i]) < 0)
			continue;      /* a stale socket of a VMM that died */
		if (!list_filter(sts[i], flags)) {
			json_object_put(sts[i]);
			sts[i] = NULL;
			continue;
		}
		count++;
	}
	if (need_results) {
		ok = xdr_u_int(&c->out, &count);
		for (i = 0; ok && i < n; i++) {
			struct lv_domain d;

			if (!sts[i])
				continue;
			vm_domain(sts[i], names[i], &d);
			ok = vmig__lv_xdr_domain(&c->out, &d);
		}
	} else {
		u_int zero = 0;

		ok = xdr_u_int(&c->out, &zero);
	}
	ok = ok && xdr_u_int(&c->out, &count);
	for (i = 0; i < n; i++)
		json_object_put(sts[i]);
	free(sts);
	free_names(names, all);
	REPLY(ok);
	return 0;
}

/* Old clients: the ids of up to @max running VMs, in @ids. */
static int running_ids(struct lv_call *c, int max, int *ids, u_int *count)
{
	char **names;
	size_t n, i;

	*count = 0;
	if (list_names(c->srv, &names, &n) < 0)
		return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot read %s",
				     c->srv->run_dir);
	for (i = 0; i < n && (int)*count < max; i++) {
		struct json_object *st;

		if (vm_status(c->srv, names[i], &st) < 0)
			continue;
		if (vm_active(st))
			ids[(*count)++] = (int)ju64(st, "pid");
		json_object_put(st);
	}
	free_names(names, n);
	return 0;
}

static int p_list_domains(struct lv_call *c)
{
	int maxids, ids[1024];
	u_int count, i;

	ARGS(xdr_int(&c->in, &maxids));
	if (running_ids(c, maxids < 1024 ? maxids : 1024, ids, &count) < 0)
		return -1;
	REPLY(xdr_u_int(&c->out, &count));
	for (i = 0; i < count; i++)
		REPLY(xdr_int(&c->out, &ids[i]));
	return 0;
}

static int p_num_of_domains(struct lv_call *c)
{
	int ids[1024];
	u_int count;

	if (running_ids(c, 1024, ids, &count) < 0)
		return -1;
	return reply_int(c, (int)count);
}

/* The names of up to @max defined domains not running, in @names (whose
 * strings move to the front and are freed by free_names()). */
static int inactive_defined(struct lv_call *c, size_t max, char ***names, size_t *n,
			    size_t *count)
{
	size_t i;

	*count = 0;
	if (list_names(c->srv, names, n) < 0)
		return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot read %s",
				     c->srv->config_dir);
	for (i = 0; i < *n; i++) {
		struct json_object *st;
		bool inactive;

		if (dom_status(c->srv, (*names)[i], &st) < 0)
			continue;
		inactive = st_persistent(st) && !vm_active(st);
		json_object_put(st);
		if (inactive && *count < max) {
			char *t = (*names)[*count];

			(*names)[*count] = (*names)[i];
			(*names)[i] = t;
			(*count)++;
		}
	}
	return 0;
}

static int p_list_defined(struct lv_call *c)
{
	char **names;
	size_t n, count, i;
	int max;
	u_int k;
	bool ok;

	ARGS(xdr_int(&c->in, &max));
	if (max < 0 || (u_int)max > LV_DOMAINS_MAX)
		return vmig__lv_fail(c, VIR_ERR_RPC, "maxnames %d is out of range (0 to %u)",
				     max, LV_DOMAINS_MAX);
	if (inactive_defined(c, (size_t)max, &names, &n, &count) < 0)
		return -1;
	k = (u_int)count;
	ok = xdr_u_int(&c->out, &k);
	for (i = 0; ok && i < count; i++)
		ok = vmig__lv_xdr_string(&c->out, &names[i]);
	free_names(names, n);
	REPLY(ok);
	return 0;
}

static int p_num_defined(struct lv_call *c)
{
	char **names;
	size_t n, count;

	if (inactive_defined(c, LV_DOMAINS_MAX, &names, &n, &count) < 0)
		return -1;
	free_names(names, n);
	return reply_int(c, (int)count);
}

static int reply_domain(struct lv_call *c, struct json_object *st, const char *name)
{
	struct lv_domain d;

	vm_domain(st, name, &d);
	REPLY(vmig__lv_xdr_domain(&c->out, &d));
	return 0;
}

static int p_lookup_by_name(struct lv_call *c)
{
	struct json_object *st;
	char *name = NULL;
	int ret;

	ARGS(vmig__lv_xdr_string(&c->in, &name));
	if (dom_status(c->srv, name, &st) < 0) {
		vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "no VM named '%s' runs in %s or is "
			      "defined in %s", name, c->srv->run_dir, c->srv->config_dir);
		free(name);
		return -1;
	}
	ret = reply_domain(c, st, name);
	json_object_put(st);
	free(name);
	return ret;
}

/* Find the running VM whose UUID (@uuid) or id (@id) matches. */
static int lookup_by(struct lv_call *c, const unsigned char *uuid, int id)
{
	char **names, want[37];
	size_t n, i;
	int ret = 1;

	if (list_names(c->srv, &names, &n) < 0)
		n = 0;
	for (i = 0; i < n && ret > 0; i++) {
		struct json_object *st;
		unsigned char u[16];

		if (dom_status(c->srv, names[i], &st) < 0)
			continue;
		st_uuid(st, names[i], u);
		if (uuid ? !memcmp(u, uuid, 16) : (vm_active(st) && (int)ju64(st, "pid") == id))
			ret = reply_domain(c, st, names[i]);
		json_object_put(st);
	}
	free_names(names, n);
	if (ret <= 0)
		return ret;
	if (uuid) {
		uuid_format(uuid, want);
		return vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "no VM with UUID %s runs in %s "
				     "or is defined in %s", want, c->srv->run_dir,
				     c->srv->config_dir);
	}
	return vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "no VM with id %d "
			     "runs in %s", id, c->srv->run_dir);
}

static int p_lookup_by_uuid(struct lv_call *c)
{
	unsigned char uuid[16];

	ARGS(xdr_opaque(&c->in, (char *)uuid, 16));
	return lookup_by(c, uuid, 0);
}

static int p_lookup_by_id(struct lv_call *c)
{
	int id;

	ARGS(xdr_int(&c->in, &id));
	return lookup_by(c, NULL, id);
}

/* ------------------------------------------------------------------------
 * Domain information
 */

/* CPU time of the VMM process in ns, or 0. */
static uint64_t cpu_time_ns(long pid)
{
	char path[64], buf[1024], *p;
	unsigned long long ut = 0, stt = 0;
	long hz = sysconf(_SC_CLK_TCK);
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	p = fgets(buf, sizeof(buf), f);
	fclose(f);
	if (!p || !(p = strrchr(buf, ')')))
		return 0;
	/* After "pid (comm)": state is field 3; utime and stime are 14, 15. */
	if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
		   &ut, &stt) != 2 || hz <= 0)
		return 0;
	return (uint64_t)(ut + stt) * (1000000000ull / (uint64_t)hz);
}

static int p_get_info(struct lv_call *c)
{
	WITH_DOMAIN(true);
	{
		int state, reason;
		u_char s;
		uint64_t mem = ju64(st, "memory") / 1024, cpu = cpu_time_ns((long)ju64(st, "pid"));
		u_short vcpus = (u_short)ju64(st, "vcpus");
		bool ok;

		vm_state(st, &state, &reason);
		s = (u_char)state;
		ok = xdr_u_char(&c->out, &s) && xdr_uint64_t(&c->out, &mem) &&
		     xdr_uint64_t(&c->out, &mem) && xdr_u_short(&c->out, &vcpus) &&
		     xdr_uint64_t(&c->out, &cpu);
		if (!ok)
			vmig__lv_fail(c, VIR_ERR_RPC, "reply too large");
		DONE(ok ? 0 : -1);
	}
}

static int p_get_state(struct lv_call *c)
{
	u_int flags;

	WITH_DOMAIN(xdr_u_int(&c->in, &flags));
	{
		int state, reason;
		bool ok;

		vm_state(st, &state, &reason);
		ok = xdr_int(&c->out, &state) && xdr_int(&c->out, &reason);
		DONE(ok ? 0 : -1);
	}
}

static int p_get_control_info(struct lv_call *c)
{
	u_int flags;

	WITH_DOMAIN(xdr_u_int(&c->in, &flags));
	{
		struct json_object *m;
		u_int state = VIR_DOMAIN_CONTROL_OK, details = 0;
		uint64_t t = 0;
		bool ok;

		if (json_object_object_get_ex(st, "migration", &m)) {
			const char *ms = jstr(m, "status", "");

			if (!strcmp(ms, "setup") || !strcmp(ms, "active") ||
			    !strcmp(ms, "switchover")) {
				state = VIR_DOMAIN_CONTROL_JOB;
				t = ju64(m, "total_time_ms");
			}
		}
		ok = xdr_u_int(&c->out, &state) && xdr_u_int(&c->out, &details) &&
		     xdr_uint64_t(&c->out, &t);
		DONE(ok ? 0 : -1);
	}
}

/* Procedures that answer a constant about an existing VM. */
static int p_domain_const(struct lv_call *c)
{
	WITH_DOMAIN(true);
	{
		int v = 0;
		uint64_t mem;
		bool ok;

		switch (c->hdr.proc) {
		case P_DOMAIN_IS_ACTIVE:
			v = vm_active(st);
			break;
		case P_DOMAIN_GET_MAX_VCPUS:
			v = (int)ju64(st, "vcpus");
			break;
		case P_DOMAIN_GET_MAX_MEMORY:
			mem = ju64(st, "memory") / 1024;
			ok = xdr_uint64_t(&c->out, &mem);
			DONE(ok ? 0 : -1);
		case P_DOMAIN_GET_OS_TYPE: {
			char *hvm = (char *)"hvm";

			ok = vmig__lv_xdr_string(&c->out, &hvm);
			DONE(ok ? 0 : -1);
		}
		case P_DOMAIN_IS_PERSISTENT:
			v = st_persistent(st);
			break;
		default:   /* autostart, updated: never */
			v = 0;
			break;
		}
		ok = xdr_int(&c->out, &v);
		DONE(ok ? 0 : -1);
	}
}

static int p_domain_flags_const(struct lv_call *c)
{
	u_int flags;

	WITH_DOMAIN(xdr_u_int(&c->in, &flags));
	{
		int v = c->hdr.proc == P_DOMAIN_GET_VCPUS_FLAGS ? (int)ju64(st, "vcpus") : 0;
		bool ok = xdr_int(&c->out, &v);

		DONE(ok ? 0 : -1);
	}
}

static void xml_escape(const char *s, char *out, size_t len)
{
	size_t o = 0;

	for (; *s && o + 7 < len; s++) {
		const char *r = NULL;

		switch (*s) {
		case '&': r = "&amp;"; break;
		case '<': r = "&lt;"; break;
		case '>': r = "&gt;"; break;
		case '\'': r = "&apos;"; break;
		case '"': r = "&quot;"; break;
		}
		if (r) {
			memcpy(out + o, r, strlen(r));
			o += strlen(r);
		} else {
			out[o++] = *s;
		}
	}
	out[o] = 0;
}

static int p_get_xml_desc(struct lv_call *c)
{
	u_int flags;

	WITH_DOMAIN(xdr_u_int(&c->in, &flags));
	{
		char xml[8192], uuid[37], workload[1024] = "", exe[4096], id[32] = "";
		unsigned char u[16];
		uint64_t kib = ju64(st, "memory") / 1024;
		const char *w = jstr(st, "workload", NULL);
		ssize_t n;
		int len;
		bool ok;

		/* A domain not running, or the definition asked for: the XML as
		 * defined. */
		if (st_persistent(st) && (!vm_active(st) || (flags & VIR_DOMAIN_XML_INACTIVE))) {
			char *def = NULL;
			int ret = def_read(c->srv, dom.name, &def);

			if (ret < 0) {
				vmig__lv_fail(c, ret == -ENOENT ? VIR_ERR_NO_DOMAIN :
					      VIR_ERR_OPERATION_FAILED, "cannot read the definition "
					      "of '%s' in %s: %s", dom.name, c->srv->config_dir,
					      strerror(-ret));
				DONE(-1);
			}
			ok = vmig__lv_xdr_string(&c->out, &def);
			free(def);
			if (!ok)
				vmig__lv_fail(c, VIR_ERR_INTERNAL_ERROR, "the domain XML does not fit");
			DONE(ok ? 0 : -1);
		}
		st_uuid(st, dom.name, u);
		uuid_format(u, uuid);
		if (w) {
			char esc[900];

			xml_escape(w, esc, sizeof(esc));
			snprintf(workload, sizeof(workload), "      <vmig:workload>%s</vmig:workload>\n",
				 esc);
		}
		n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
		exe[n > 0 ? n : 0] = 0;
		if (vm_active(st))
			snprintf(id, sizeof(id), " id='%" PRIu64 "'", ju64(st, "pid"));
		len = snprintf(xml, sizeof(xml),
			"<domain type='kvm'%s>\n"
			"  <name>%s</name>\n"
			"  <uuid>%s</uuid>\n"
			"  <metadata>\n"
			"    <vmig:vm xmlns:vmig='" XML_NS "'>\n"
			"      <vmig:state>%s</vmig:state>\n"
			"      <vmig:pid>%" PRIu64 "</vmig:pid>\n"
			"      <vmig:uptime-ms>%" PRIu64 "</vmig:uptime-ms>\n"
			"      <vmig:socket>%s/%s.sock</vmig:socket>\n"
			"%s"
			"    </vmig:vm>\n"
			"  </metadata>\n"
			"  <memory unit='KiB'>%" PRIu64 "</memory>\n"
			"  <currentMemory unit='KiB'>%" PRIu64 "</currentMemory>\n"
			"  <vcpu placement='static'>%" PRIu64 "</vcpu>\n"
			"  <os>\n"
			"    <type arch='x86_64'>hvm</type>\n"
			"  </os>\n"
			"  <on_poweroff>destroy</on_poweroff>\n"
			"  <on_reboot>restart</on_reboot>\n"
			"  <on_crash>destroy</on_crash>\n"
			"  <devices>\n"
			"    <emulator>%s</emulator>\n"
			"    <serial type='unix'>\n"
			"      <source mode='bind' path='%s/%s.console'/>\n"
			"      <target port='0'/>\n"
			"    </serial>\n"
			"  </devices>\n"
			"</domain>\n",
			id, dom.name, uuid, jstr(st, "state", "?"),
			ju64(st, "pid"), ju64(st, "uptime_ms"), c->srv->run_dir, dom.name, workload,
			kib, kib, ju64(st, "vcpus"), exe[0] ? exe : "vmig", c->srv->run_dir, dom.name);
		ok = len > 0 && (size_t)len < sizeof(xml);
		if (ok) {
			char *p = xml;

			ok = vmig__lv_xdr_string(&c->out, &p);
		}
		if (!ok)
			vmig__lv_fail(c, VIR_ERR_INTERNAL_ERROR, "the domain XML does not fit");
		DONE(ok ? 0 : -1);
	}
}

/* ------------------------------------------------------------------------
 * Life cycle
 */

/* Wait until VM @name's VMM has exited (its pid file lock is free). */
static int wait_gone(struct lv_server *s, const char *name, int timeout_ms)
{
	return vmig_rundir_wait_gone(s->run_dir, name, timeout_ms);
}

static int simple_vm_cmd(struct lv_call *c, const char *cmd, bool with_flags)
{
	u_int flags = 0;

	WITH_DOMAIN(!with_flags || xdr_u_int(&c->in, &flags));
	{
		struct json_object *r = NULL;
		char msg[600];
		int ret;

		if (with_flags && flags && strcmp(cmd, "stop")) {
			vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig takes no flags "
				      "here (got 0x%x)", flags);
			DONE(-1);
		}
		if (!vm_active(st)) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' is not running",
				      dom.name);
			DONE(-1);
		}
		ret = vm_call(c->srv, dom.name, cmd, NULL, &r, msg, sizeof(msg));
		json_object_put(r);
		if (ret == -EOPNOTSUPP && !strcmp(cmd, "shutdown")) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_UNSUPPORTED, "VM '%s' cannot be asked "
				      "to shut down: %s (use 'virsh destroy' to stop it)", dom.name,
				      msg[0] ? msg : "its guest did not take the power button");
			DONE(-1);
		}
		if (ret < 0) {
			vmig__lv_fail(c, ret == -ENOENT ? VIR_ERR_NO_DOMAIN :
				      ret == -EBUSY ? VIR_ERR_OPERATION_INVALID :
				      VIR_ERR_OPERATION_FAILED, "VM '%s': %s: %s", dom.name, cmd,
				      msg[0] ? msg : "the VM went away");
			DONE(-1);
		}
		if (!strcmp(cmd, "stop") && wait_gone(c->srv, dom.name, 30000) < 0) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_TIMEOUT, "VM '%s' was asked to stop "
				      "but its VMM still runs after 30 s", dom.name);
			DONE(-1);
		}
		vmig_log(VMIG_LOG_INFO, "libvirt: %s %s", cmd, dom.name);
		DONE(0);
	}
}

static int p_suspend(struct lv_call *c)
{
	return simple_vm_cmd(c, "pause", false);
}

static int p_resume(struct lv_call *c)
{
	return simple_vm_cmd(c, "resume", false);
}

static int p_destroy(struct lv_call *c)
{
	return simple_vm_cmd(c, "stop", c->hdr.proc == P_DOMAIN_DESTROY_FLAGS);
}

static int p_shutdown(struct lv_call *c)
{
	return simple_vm_cmd(c, "shutdown", c->hdr.proc == P_DOMAIN_SHUTDOWN_FLAGS);
}

/* ------------------------------------------------------------------------
 * Starting a VM from domain XML (domain-create-xml: transient, as every
 * vmig VM is)
 */

/* Run `vmig run ARGV... --detach` for the run directory; 0, or -1 with the
 * call's error (the last line vmig wrote). */
static int run_vmig(struct lv_call *c, const char *const *argv)
{
	char out[4096], exe[4096];
	ssize_t n;
	size_t len = 0;
	int pipefd[2], st;
	pid_t pid;

	char rundir_env[4200], **envp;
	size_t nenv = 0, k, j = 0;

	n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n <= 0)
		return vmig__lv_fail(c, VIR_ERR_INTERNAL_ERROR, "cannot find the vmig binary");
	exe[n] = 0;
	/* The child's environment: ours, with this endpoint's run directory
	 * (built here: no setenv() in a process with threads). */
	while (environ[nenv])
		nenv++;
	envp = calloc(nenv + 2, sizeof(*envp));
	if (!envp)
		return vmig__lv_fail(c, VIR_ERR_NO_MEMORY, "out of memory");
	snprintf(rundir_env, sizeof(rundir_env), "VMIG_RUN_DIR=%s", c->srv->run_dir);
	for (k = 0; k < nenv; k++)
		if (strncmp(environ[k], "VMIG_RUN_DIR=", 13))
			envp[j++] = environ[k];
	envp[j++] = rundir_env;
	envp[j] = NULL;
	if (pipe2(pipefd, O_CLOEXEC) < 0) {
		free(envp);
		return vmig__lv_fail(c, VIR_ERR_INTERNAL_ERROR, "pipe: %s", strerror(errno));
	}
	pid = fork();
	if (pid < 0) {
		free(envp);
		close(pipefd[0]);
		close(pipefd[1]);
		return vmig__lv_fail(c, VIR_ERR_INTERNAL_ERROR, "fork: %s", strerror(errno));
	}
	if (pid == 0) {
		/* Only async-signal-safe calls here: the parent has threads. */
		sigset_t none;
		int fd = open("/dev/null", O_RDWR);

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		dup2(fd, 0);
		dup2(pipefd[1], 1);
		dup2(pipefd[1], 2);
		execve(exe, (char *const *)argv, envp);
		_exit(127);
	}
	free(envp);
	close(pipefd[1]);
	while (len < sizeof(out) - 1 && (n = read(pipefd[0], out + len, sizeof(out) - 1 - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		len += (size_t)n;
	}
	out[len] = 0;
	close(pipefd[0]);
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
		return 0;
	while (len && out[len - 1] == '\n')
		out[--len] = 0;
	return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "vmig run: %s",
			     strrchr(out, '\n') ? strrchr(out, '\n') + 1 : out);
}

/* Start VM @sp (`vmig run`), paused if @flags say so; 0, or -1 with the
 * call's error.  Caller holds defs_lock and checked the name is free. */
static int start_spec(struct lv_call *c, const struct dom_spec *sp, unsigned int flags)
{
	const char *argv[24];
	unsigned int i = 0;

	argv[i++] = "vmig";
	argv[i++] = "run";
	argv[i++] = sp->name;
	argv[i++] = "--memory";
	argv[i++] = sp->mem_arg;
	argv[i++] = "--vcpus";
	argv[i++] = sp->vcpus;
	if (sp->kernel[0]) {
		argv[i++] = "--kernel";
		argv[i++] = sp->kernel;
		if (sp->initrd[0]) {
			argv[i++] = "--initrd";
			argv[i++] = sp->initrd;
		}
		if (sp->cmdline[0]) {
			argv[i++] = "--cmdline";
			argv[i++] = sp->cmdline;
		}
	} else if (sp->workload[0]) {
		argv[i++] = "--workload";
		argv[i++] = sp->workload;
	}
	argv[i++] = "--detach";
	argv[i] = NULL;
	if (run_vmig(c, argv) < 0)
		return -1;
	vmig_log(VMIG_LOG_INFO, "libvirt: started %s (%s, %s vCPUs%s%s)", sp->name, sp->mem_arg,
		 sp->vcpus, sp->kernel[0] ? ", kernel " : "", sp->kernel);
	if (flags & VIR_DOMAIN_START_PAUSED) {
		struct json_object *r = NULL;
		char msg[600];

		if (vm_call(c->srv, sp->name, "pause", NULL, &r, msg, sizeof(msg)) < 0)
			return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot pause '%s': %s",
					     sp->name, msg);
		json_object_put(r);
	}
	return 0;
}

/* Reply with domain @name as it is now. */
static int reply_dom_now(struct lv_call *c, const char *name)
{
	struct json_object *st;
	int ret;

	if (dom_status(c->srv, name, &st) < 0)
		return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "VM '%s' started and went "
				     "away", name);
	ret = reply_domain(c, st, name);
	json_object_put(st);
	return ret;
}

static int p_create_xml(struct lv_call *c)
{
	char *xml = NULL, msg[512];
	struct json_object *st;
	struct dom_spec sp;
	u_int flags;
	int ret = -1, code;

	ARGS(vmig__lv_xdr_string(&c->in, &xml) && xdr_u_int(&c->in, &flags));
	if (flags & ~(unsigned int)(VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_VALIDATE)) {
		vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig takes only the paused and "
			      "validate flags here (got 0x%x)", flags);
		goto out;
	}
	code = parse_spec(xml, &sp, msg, sizeof(msg));
	if (code) {
		vmig__lv_fail(c, code, "%s", msg);
		goto out;
	}
	pthread_mutex_lock(&c->srv->defs_lock);
	if (vm_status(c->srv, sp.name, &st) == 0) {
		json_object_put(st);
		vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' already exists", sp.name);
	} else if (dom_status(c->srv, sp.name, &st) == 0) {
		json_object_put(st);
		vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' is already defined "
			      "(start it with 'virsh start %s')", sp.name, sp.name);
	} else if (start_spec(c, &sp, flags) == 0) {
		ret = reply_dom_now(c, sp.name);
	}
	pthread_mutex_unlock(&c->srv->defs_lock);
out:
	free(xml);
	return ret;
}

/* define-xml(-flags): keep the XML as a definition. */
static int p_define_xml(struct lv_call *c)
{
	char *xml = NULL, *with_uuid = NULL, msg[512], other[128], uuid[37];
	struct json_object *st;
	struct lv_domain d;
	struct dom_spec sp;
	u_int flags = 0;
	int ret = -1, code, err;

	ARGS(vmig__lv_xdr_string(&c->in, &xml) &&
	     (c->hdr.proc != P_DOMAIN_DEFINE_XML_FLAGS || xdr_u_int(&c->in, &flags)));
	if (flags & ~(unsigned int)VIR_DOMAIN_DEFINE_VALIDATE) {
		vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig takes only the validate "
			      "flag here (got 0x%x)", flags);
		goto out;
	}
	code = parse_spec(xml, &sp, msg, sizeof(msg));
	if (code) {
		vmig__lv_fail(c, code, "%s", msg);
		goto out;
	}
	if (strlen(xml) > DEF_XML_MAX - 64) {
		vmig__lv_fail(c, VIR_ERR_XML_ERROR, "the domain XML is too long (%zu bytes; at "
			      "most %u)", strlen(xml), DEF_XML_MAX - 64);
		goto out;
	}
	if (!sp.has_uuid)
		name_uuid(sp.name, sp.uuid);
	pthread_mutex_lock(&c->srv->defs_lock);
	if (dom_status(c->srv, sp.name, &st) == 0) {
		vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' is already %s", sp.name,
			      st_persistent(st) ? "defined" : "running");
		json_object_put(st);
		goto unlock;
	}
	if (uuid_taken(c->srv, sp.uuid, sp.name, other, sizeof(other))) {
		uuid_format(sp.uuid, uuid);
		vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' already has UUID %s",
			      other, uuid);
		goto unlock;
	}
	if (!sp.has_uuid && !(with_uuid = xml_add_uuid(xml, sp.uuid))) {
		vmig__lv_fail(c, VIR_ERR_XML_ERROR, "no <domain> start tag to add a <uuid> to");
		goto unlock;
	}
	err = def_write(c->srv, sp.name, with_uuid ? with_uuid : xml);
	if (err < 0) {
		vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot write the definition of '%s' "
			      "in %s: %s", sp.name, c->srv->config_dir, strerror(-err));
		goto unlock;
	}
	vmig_log(VMIG_LOG_INFO, "libvirt: defined %s (%s, %s vCPUs) in %s", sp.name,
		 sp.mem_arg, sp.vcpus, c->srv->config_dir);
	d.name = sp.name;
	memcpy(d.uuid, sp.uuid, 16);
	d.id = -1;
	ret = vmig__lv_xdr_domain(&c->out, &d) ? 0 :
	      vmig__lv_fail(c, VIR_ERR_RPC, "the reply does not fit");
unlock:
	pthread_mutex_unlock(&c->srv->defs_lock);
out:
	free(with_uuid);
	free(xml);
	return ret;
}

/* undefine(-flags): forget the definition; a VM that runs goes on,
 * transient. */
static int p_undefine(struct lv_call *c)
{
	/* Nothing of these exists for a vmig VM: nothing to keep or remove. */
	const unsigned int ok_flags = VIR_DOMAIN_UNDEFINE_MANAGED_SAVE |
		VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | VIR_DOMAIN_UNDEFINE_NVRAM |
		VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA |
		VIR_DOMAIN_UNDEFINE_TPM | VIR_DOMAIN_UNDEFINE_KEEP_TPM;
	u_int flags = 0;

	WITH_DOMAIN(c->hdr.proc != P_DOMAIN_UNDEFINE_FLAGS || xdr_u_int(&c->in, &flags));
	{
		char path[4200];
		int ret = 0;

		if (flags & ~ok_flags) {
			vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "unknown undefine flags "
				      "0x%x", flags & ~ok_flags);
			DONE(-1);
		}
		pthread_mutex_lock(&c->srv->defs_lock);
		if (def_path(c->srv, dom.name, path, sizeof(path)) < 0)
			ret = -ENOENT;
		else if (unlink(path) < 0)
			ret = -errno;
		else
			fsync_dir(c->srv->config_dir);
		pthread_mutex_unlock(&c->srv->defs_lock);
		if (ret == -ENOENT) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "cannot undefine transient "
				      "domain '%s'", dom.name);
			DONE(-1);
		}
		if (ret < 0) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot remove %s: %s", path,
				      strerror(-ret));
			DONE(-1);
		}
		vmig_log(VMIG_LOG_INFO, "libvirt: undefined %s%s", dom.name,
			 vm_active(st) ? " (it runs on, transient)" : "");
		DONE(0);
	}
}

/* create / create-with-flags: start a defined domain. */
static int p_start(struct lv_call *c)
{
	u_int flags = 0;

	WITH_DOMAIN(c->hdr.proc != P_DOMAIN_CREATE_WITH_FLAGS || xdr_u_int(&c->in, &flags));
	{
		struct json_object *vst;
		struct dom_spec sp;
		char *xml = NULL, msg[512];
		int ret = -1, err, code;

		/* No managed save exists: force-boot changes nothing. */
		if (flags & ~(unsigned int)(VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_FORCE_BOOT)) {
			vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig takes only the "
				      "paused and force-boot flags here (got 0x%x)", flags);
			DONE(-1);
		}
		pthread_mutex_lock(&c->srv->defs_lock);
		err = def_read(c->srv, dom.name, &xml);
		if (vm_status(c->srv, dom.name, &vst) == 0) {
			json_object_put(vst);
			vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' is already "
				      "running", dom.name);
		} else if (err < 0) {
			vmig__lv_fail(c, err == -ENOENT ? VIR_ERR_NO_DOMAIN : VIR_ERR_OPERATION_FAILED,
				      "cannot read the definition of '%s' in %s: %s", dom.name,
				      c->srv->config_dir, strerror(-err));
		} else if ((code = parse_spec(xml, &sp, msg, sizeof(msg)))) {
			vmig__lv_fail(c, code, "the definition of '%s': %s", dom.name, msg);
		} else if (strcmp(sp.name, dom.name)) {
			vmig__lv_fail(c, VIR_ERR_XML_ERROR, "the definition in %s/%s.xml names "
				      "'%s'", c->srv->config_dir, dom.name, sp.name);
		} else if (start_spec(c, &sp, flags) == 0) {
			ret = c->hdr.proc == P_DOMAIN_CREATE_WITH_FLAGS ?
			      reply_dom_now(c, dom.name) : 0;
		}
		pthread_mutex_unlock(&c->srv->defs_lock);
		free(xml);
		DONE(ret);
	}
}

/* ------------------------------------------------------------------------
 * Jobs: migration statistics and abort
 */

static bool mig_running(struct json_object *m)
{
	const char *s = jstr(m, "status", "");

	return !strcmp(s, "setup") || !strcmp(s, "active") || !strcmp(s, "switchover");
}

/* The job type and the migration object of VM status @st for @completed. */
static int job_of(struct json_object *st, bool completed, struct json_object **mig)
{
	struct json_object *m;
	const char *s;

	*mig = NULL;
	if (!json_object_object_get_ex(st, "migration", &m))
		return VIR_DOMAIN_JOB_NONE;
	if (!completed)
		return mig_running(m) ? (*mig = m, VIR_DOMAIN_JOB_UNBOUNDED) : VIR_DOMAIN_JOB_NONE;
	if (mig_running(m))
		return VIR_DOMAIN_JOB_NONE;
	*mig = m;
	s = jstr(m, "status", "");
	if (!strcmp(s, "completed"))
		return VIR_DOMAIN_JOB_COMPLETED;
	if (!strcmp(s, "cancelled"))
		return VIR_DOMAIN_JOB_CANCELLED;
	return VIR_DOMAIN_JOB_FAILED;
}

static uint64_t pages_of(struct json_object *m, const char *kind)
{
	struct json_object *p;

	return json_object_object_get_ex(m, "pages", &p) ? ju64(p, kind) : 0;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/*
 * The migration this endpoint runs for VM @name (a perform3 call in
 * progress), as its latest progress event, or a "setup" one before the
 * first; NULL if there is none.  New reference.  Answered without asking
 * the VMM, whose control thread may be busy setting the migration up
 * (connecting and logging in): job statistics never wait for it.
 */
static struct json_object *our_migration(struct lv_server *s, const char *name)
{
	struct json_object *m = NULL;
	unsigned int i;

	pthread_mutex_lock(&s->lock);
	for (i = 0; i < s->nr_vms; i++) {
		struct lv_vm_setting *vs = &s->vms[i];

		if (strcmp(vs->name, name) || !vs->migrating)
			continue;
		if (vs->progress) {
			m = json_object_get(vs->progress);
		} else {
			m = json_object_new_object();
			json_object_object_add(m, "status", json_object_new_string("setup"));
			json_object_object_add(m, "total_time_ms",
					       json_object_new_uint64(now_ms() - vs->mig_started_ms));
		}
		break;
	}
	pthread_mutex_unlock(&s->lock);
	return m;
}

/*
 * The job of VM @dom (decoded by the caller): 0 with the job type in
 * *type and its migration object in *mig (new reference, or NULL), or -1
 * with the call's error (no such VM).
 */
static int job_lookup(struct lv_call *c, const char *name, bool completed, int *type,
		      struct json_object **mig)
{
	struct json_object *st, *m;

	int ret;

	*mig = NULL;
	if (!completed && (*mig = our_migration(c->srv, name))) {
		*type = VIR_DOMAIN_JOB_UNBOUNDED;
		return 0;
	}
	ret = vm_status_within(c->srv, name, 100, &st);
	if (ret == -ETIMEDOUT) {
		/* Busy: with a migration of ours that started meanwhile? */
		if (!completed && (*mig = our_migration(c->srv, name))) {
			*type = VIR_DOMAIN_JOB_UNBOUNDED;
			return 0;
		}
		ret = vm_status(c->srv, name, &st);
	}
	if (ret < 0)
		return vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "no VM named '%s' runs in %s", name,
				     c->srv->run_dir);
	*type = job_of(st, completed, &m);
	*mig = m ? json_object_get(m) : NULL;
	json_object_put(st);
	return 0;
}

static int p_get_job_info(struct lv_call *c)
{
	struct json_object *m;
	struct lv_domain dom = { 0 };
	uint64_t v[11] = { 0 };
	int type, i;
	bool ok;

	if (!vmig__lv_xdr_domain(&c->in, &dom)) {
		vmig__lv_domain_fini(&dom);
		return bad_args(c);
	}
	if (job_lookup(c, dom.name, false, &type, &m) < 0) {
		vmig__lv_domain_fini(&dom);
		return -1;
	}
	if (m) {
		v[0] = ju64(m, "total_time_ms");
		v[1] = ju64(m, "eta_ms");
		v[2] = v[5] = ju64(m, "ram_total_bytes");
		v[3] = v[6] = ju64(m, "transferred_bytes");
		v[4] = v[7] = ju64(m, "remaining_bytes");
	}
	ok = xdr_int(&c->out, &type);
	for (i = 0; ok && i < 11; i++)
		ok = xdr_uint64_t(&c->out, &v[i]);
	json_object_put(m);
	vmig__lv_domain_fini(&dom);
	REPLY(ok);
	return 0;
}

static bool put_ull(XDR *x, u_int *n, const char *field, uint64_t v)
{
	struct lv_param p = { .field = (char *)field, .type = VIR_TYPED_PARAM_ULLONG, .v.ul = v };

	(*n)++;
	return vmig__lv_xdr_string(x, &p.field) && xdr_int(x, &p.type) && xdr_uint64_t(x, &p.v.ul);
}

/* The typed parameters of migration @m; *n counts them. */
static bool put_job_params(XDR *x, struct json_object *m, bool done, u_int *n)
{
	uint64_t zero = pages_of(m, "zero");
	uint64_t normal = pages_of(m, "raw") + pages_of(m, "lz4");
	int op = VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT;
	struct lv_param p = { .field = (char *)VIR_DOMAIN_JOB_OPERATION,
			      .type = VIR_TYPED_PARAM_INT };
	bool ok;

	(*n)++;
	ok = vmig__lv_xdr_string(x, &p.field) && xdr_int(x, &p.type) && xdr_int(x, &op);
#define ULL(f, v) ok = ok && put_ull(x, n, f, v)
	ULL(VIR_DOMAIN_JOB_TIME_ELAPSED, ju64(m, "total_time_ms"));
	if (!done)
		ULL(VIR_DOMAIN_JOB_TIME_REMAINING, ju64(m, "eta_ms"));
	ULL(VIR_DOMAIN_JOB_DOWNTIME, done ? ju64(m, "downtime_ms") :
	    ju64(m, "expected_downtime_ms"));
	ULL(VIR_DOMAIN_JOB_DATA_TOTAL, ju64(m, "ram_total_bytes"));
	ULL(VIR_DOMAIN_JOB_DATA_PROCESSED, ju64(m, "transferred_bytes"));
	ULL(VIR_DOMAIN_JOB_DATA_REMAINING, ju64(m, "remaining_bytes"));
	ULL(VIR_DOMAIN_JOB_MEMORY_TOTAL, ju64(m, "ram_total_bytes"));
	ULL(VIR_DOMAIN_JOB_MEMORY_PROCESSED, ju64(m, "transferred_bytes"));
	ULL(VIR_DOMAIN_JOB_MEMORY_REMAINING, ju64(m, "remaining_bytes"));
	ULL(VIR_DOMAIN_JOB_MEMORY_CONSTANT, zero);
	ULL(VIR_DOMAIN_JOB_MEMORY_NORMAL, normal);
	ULL(VIR_DOMAIN_JOB_MEMORY_NORMAL_BYTES, normal * 4096);
	ULL(VIR_DOMAIN_JOB_MEMORY_BPS, ju64(m, "bandwidth_bps"));
	ULL(VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE, ju64(m, "dirty_rate_pps"));
	ULL(VIR_DOMAIN_JOB_MEMORY_PAGE_SIZE, 4096);
	ULL(VIR_DOMAIN_JOB_MEMORY_ITERATION, ju64(m, "iteration"));
	ULL(VIR_DOMAIN_JOB_COMPRESSION_PAGES, pages_of(m, "lz4"));
#undef ULL
	if (ok && json_object_object_get_ex(m, "error", NULL)) {
		struct lv_param e = { .field = (char *)VIR_DOMAIN_JOB_ERRMSG,
				      .type = VIR_TYPED_PARAM_STRING,
				      .v.s = (char *)jstr(m, "error", "") };

		(*n)++;
		ok = vmig__lv_xdr_string(x, &e.field) && xdr_int(x, &e.type) &&
		     vmig__lv_xdr_string(x, &e.v.s);
	}
	return ok;
}

static int p_get_job_stats(struct lv_call *c)
{
	struct json_object *m;
	struct lv_domain dom = { 0 };
	u_int flags, n = 0, pos_n, end;
	int type;
	bool ok;

	if (!vmig__lv_xdr_domain(&c->in, &dom) || !xdr_u_int(&c->in, &flags)) {
		vmig__lv_domain_fini(&dom);
		return bad_args(c);
	}
	if (job_lookup(c, dom.name, flags & VIR_DOMAIN_JOB_STATS_COMPLETED, &type, &m) < 0) {
		vmig__lv_domain_fini(&dom);
		return -1;
	}
	ok = xdr_int(&c->out, &type);
	pos_n = xdr_getpos(&c->out);
	ok = ok && xdr_u_int(&c->out, &n);
	if (ok && m)
		ok = put_job_params(&c->out, m, type != VIR_DOMAIN_JOB_UNBOUNDED, &n);
	if (ok) {
		/* Now that the count is known, write it in its place. */
		end = xdr_getpos(&c->out);
		xdr_setpos(&c->out, pos_n);
		ok = xdr_u_int(&c->out, &n);
		xdr_setpos(&c->out, end);
	}
	json_object_put(m);
	vmig__lv_domain_fini(&dom);
	REPLY(ok);
	return 0;
}

static int p_abort_job(struct lv_call *c)
{
	WITH_DOMAIN(true);
	{
		struct json_object *r = NULL;
		char msg[600];
		int ret = vm_call(c->srv, dom.name, "cancel", NULL, &r, msg, sizeof(msg));

		json_object_put(r);
		if (ret == -ENOENT && msg[0]) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "no job is active on the "
				      "domain: %s", msg);
			DONE(-1);
		}
		if (ret < 0) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "VM '%s': cancel: %s", dom.name,
				      msg[0] ? msg : "the VM went away");
			DONE(-1);
		}
		vmig_log(VMIG_LOG_INFO, "libvirt: abort-job %s: cancel requested", dom.name);
		DONE(0);
	}
}

static int p_set_max_speed(struct lv_call *c)
{
	uint64_t bw;
	u_int flags;

	WITH_DOMAIN(xdr_uint64_t(&c->in, &bw) && xdr_u_int(&c->in, &flags));
	{
		struct lv_vm_setting *vs;

		if (flags) {
			vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig has no post-copy: "
				      "flags 0x%x not supported", flags);
			DONE(-1);
		}
		pthread_mutex_lock(&c->srv->lock);
		vs = vmig__lv_setting_locked(c->srv, dom.name);
		if (vs)
			vs->max_speed_mibs = bw;
		pthread_mutex_unlock(&c->srv->lock);
		if (!vs) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "too many VMs with settings");
			DONE(-1);
		}
		vmig_log(VMIG_LOG_INFO, "libvirt: %s: migration bandwidth %" PRIu64 " MiB/s",
			 dom.name, bw);
		/* A migration already running takes the new cap at once. */
		set_running_bandwidth(c->srv, dom.name,
				      bw > UINT64_MAX / 1048576 ? UINT64_MAX : bw * 1048576);
		DONE(0);
	}
}

static int p_get_max_speed(struct lv_call *c)
{
	u_int flags;

	WITH_DOMAIN(xdr_u_int(&c->in, &flags));
	{
		struct lv_vm_setting *vs;
		uint64_t bw = 0;
		bool ok;

		pthread_mutex_lock(&c->srv->lock);
		vs = vmig__lv_setting_locked(c->srv, dom.name);
		if (vs)
			bw = vs->max_speed_mibs;
		pthread_mutex_unlock(&c->srv->lock);
		ok = xdr_uint64_t(&c->out, &bw);
		DONE(ok ? 0 : -1);
	}
}

static int p_set_max_downtime(struct lv_call *c)
{
	uint64_t ms;
	u_int flags;

	WITH_DOMAIN(xdr_uint64_t(&c->in, &ms) && xdr_u_int(&c->in, &flags));
	{
		struct lv_vm_setting *vs;

		if (!ms || ms > UINT32_MAX) {
			vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "the downtime must be 1 to %u ms",
				      UINT32_MAX);
			DONE(-1);
		}
		pthread_mutex_lock(&c->srv->lock);
		vs = vmig__lv_setting_locked(c->srv, dom.name);
		if (vs)
			vs->max_downtime_ms = ms;
		pthread_mutex_unlock(&c->srv->lock);
		vmig_log(VMIG_LOG_INFO, "libvirt: %s: maximum downtime %" PRIu64 " ms", dom.name, ms);
		DONE(vs ? 0 : -1);
	}
}

/* ------------------------------------------------------------------------
 * Peer-to-peer migration
 */

/* %XX-decode @s in place. */
static void percent_decode(char *s)
{
	char *o = s;

	for (; *s; s++) {
		if (*s == '%' && isxdigit((unsigned char)s[1]) && isxdigit((unsigned char)s[2])) {
			char b[3] = { s[1], s[2], 0 };

			*o++ = (char)strtoul(b, NULL, 16);
			s += 2;
		} else {
			*o++ = *s;
		}
	}
	*o = 0;
}

struct dest {
	char vmig_uri[1200];       /* ssh://[USER@]HOST[:PORT] */
	char keyfile[1024];
	char known_hosts[1024];
	bool no_verify;
};

/*
 * vmig+ssh://[USER@]HOST[:PORT][/PATH][?PARAMS] (also vmig://, vmig+libssh://,
 * vmig+libssh2://) to ssh://[USER@]HOST[:PORT] and the query parameters
 * that concern us: keyfile, known_hosts, no_verify.  Others (socket,
 * no_tty, ...) concern a libvirt client's transport and are ignored.
 */
static int parse_dconnuri(struct lv_call *c, const char *uri, struct dest *d)
{
	char buf[2048], *p, *auth, *query, *end;
	size_t slen;

	memset(d, 0, sizeof(*d));
	if (strlen(uri) >= sizeof(buf))
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "destination URI too long");
	snprintf(buf, sizeof(buf), "%s", uri);
	p = strstr(buf, "://");
	if (!p)
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "bad destination URI '%s'", uri);
	slen = (size_t)(p - buf);
	if (!((slen == 4 && !strncmp(buf, "vmig", 4)) || (slen == 8 && !strncmp(buf, "vmig+ssh", 8)) ||
	      (slen == 11 && !strncmp(buf, "vmig+libssh", 11)) ||
	      (slen == 12 && !strncmp(buf, "vmig+libssh2", 12))))
		return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "destination URI '%s': "
				     "vmig migrates over SSH: use vmig+ssh://[USER@]HOST[:PORT]/"
				     "system, or the migrate_uri parameter (--migrateuri "
				     "tcp://HOST:PORT) for a 'vmig incoming --listen' there", uri);
	auth = p + 3;
	end = auth + strcspn(auth, "/?");
	query = strchr(end, '?');
	*end = 0;
	if (!*auth || *auth == '@' || auth[strlen(auth) - 1] == '@')
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "destination URI '%s' has no host",
				     uri);
	if (strlen(auth) + 7 > sizeof(d->vmig_uri))
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "destination host too long");
	memcpy(d->vmig_uri, "ssh://", 6);
	memcpy(d->vmig_uri + 6, auth, strlen(auth) + 1);
	if (query) {
		char *save = NULL, *kv;

		for (kv = strtok_r(query + 1, "&", &save); kv; kv = strtok_r(NULL, "&", &save)) {
			char *eq = strchr(kv, '=');

			if (!eq)
				continue;
			*eq = 0;
			percent_decode(eq + 1);
			if (!strcmp(kv, "keyfile"))
				snprintf(d->keyfile, sizeof(d->keyfile), "%s", eq + 1);
			else if (!strcmp(kv, "known_hosts"))
				snprintf(d->known_hosts, sizeof(d->known_hosts), "%s", eq + 1);
			else if (!strcmp(kv, "no_verify"))
				d->no_verify = atoi(eq + 1) != 0;
		}
	}
	if ((d->keyfile[0] && d->keyfile[0] != '/') ||
	    (d->known_hosts[0] && d->known_hosts[0] != '/'))
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "keyfile and known_hosts in the "
				     "destination URI must be absolute paths on this host");
	return 0;
}

static const struct lv_param *param_find(const struct lv_param *p, uint32_t n,
					 const char *field, int type)
{
	uint32_t i;

	for (i = 0; i < n; i++)
		if (!strcmp(p[i].field, field) && p[i].type == type)
			return &p[i];
	return NULL;
}

/* Migration flags vmig cannot honour, with what to say. */
static const struct {
	unsigned int flag;
	const char *what;
} unsupported_flags[] = {
	{ VIR_MIGRATE_TUNNELLED, "tunnelled migration (vmig's stream goes over SSH itself)" },
	{ VIR_MIGRATE_NON_SHARED_DISK, "copying disks (vmig VMs have no disks)" },
	{ VIR_MIGRATE_NON_SHARED_INC, "copying disks (vmig VMs have no disks)" },
	{ VIR_MIGRATE_OFFLINE, "offline migration (vmig VMs have no definition apart from "
			       "the running VM)" },
	{ VIR_MIGRATE_POSTCOPY, "post-copy" },
	{ VIR_MIGRATE_POSTCOPY_RESUME, "post-copy" },
	{ VIR_MIGRATE_RDMA_PIN_ALL, "RDMA" },
	{ VIR_MIGRATE_TLS, "TLS (vmig+ssh encrypts with SSH)" },
	{ VIR_MIGRATE_ZEROCOPY, "zero-copy" },
	{ VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES, "copying disks" },
};

/* Build the VM's migrate request from the call's flags and parameters. */
static int build_request(struct lv_call *c, const char *name, const char *dconnuri,
			 const struct lv_param *p, uint32_t np, unsigned int flags, bool running,
			 struct json_object **out)
{
	const struct lv_param *mig_uri, *dname, *bw, *par, *cmp;
	struct json_object *req, *ssh = NULL;
	struct lv_vm_setting *vs;
	uint64_t speed = 0, downtime = 0;
	uint32_t i;
	size_t k;

	*out = NULL;
	if (!(flags & VIR_MIGRATE_PEER2PEER))
		return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig migrates "
				     "peer-to-peer only: use virsh migrate --p2p "
				     "(VIR_MIGRATE_PEER2PEER)");
	for (k = 0; k < sizeof(unsupported_flags) / sizeof(unsupported_flags[0]); k++)
		if (flags & unsupported_flags[k].flag)
			return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig does not "
					     "support %s (migration flag 0x%x)",
					     unsupported_flags[k].what, unsupported_flags[k].flag);
	if ((flags & VIR_MIGRATE_PAUSED) && (flags & VIR_MIGRATE_LIVE) && running)
		return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "a running VM migrated "
				     "live arrives running: leave out --suspend, or --live to "
				     "migrate it paused");
	for (i = 0; i < np; i++) {
		static const char *const known[] = {
			VIR_MIGRATE_PARAM_URI, VIR_MIGRATE_PARAM_DEST_NAME,
			VIR_MIGRATE_PARAM_BANDWIDTH, VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS,
			VIR_MIGRATE_PARAM_COMPRESSION, NULL,
		};
		bool ok = false;

		for (k = 0; known[k]; k++)
			ok = ok || !strcmp(p[i].field, known[k]);
		if (!ok)
			return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "migration parameter "
					     "'%s' is not supported by vmig (it takes %s, %s, %s, "
					     "%s and %s)", p[i].field, known[0], known[1], known[2],
					     known[3], known[4]);
	}
	mig_uri = param_find(p, np, VIR_MIGRATE_PARAM_URI, VIR_TYPED_PARAM_STRING);
	dname = param_find(p, np, VIR_MIGRATE_PARAM_DEST_NAME, VIR_TYPED_PARAM_STRING);
	bw = param_find(p, np, VIR_MIGRATE_PARAM_BANDWIDTH, VIR_TYPED_PARAM_ULLONG);
	par = param_find(p, np, VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS, VIR_TYPED_PARAM_INT);
	if (dname && vmig_vm_name_valid(dname->v.s) < 0)
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "bad destination name '%s': use 1-64 "
				     "letters, digits, '.', '_' or '-'", dname->v.s);
	for (i = 0; i < np; i++) {
		cmp = &p[i];
		if (!strcmp(cmp->field, VIR_MIGRATE_PARAM_COMPRESSION) &&
		    (cmp->type != VIR_TYPED_PARAM_STRING || strcmp(cmp->v.s, "lz4")))
			return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "vmig compresses "
					     "with lz4 only, not '%s'", cmp->type ==
					     VIR_TYPED_PARAM_STRING ? cmp->v.s : "?");
	}
	if (par && (par->v.i < 1 || par->v.i > (int)VMIG_MIGRATE_MAX_CHANNELS))
		return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "parallel.connections must be 1 "
				     "to %u", VMIG_MIGRATE_MAX_CHANNELS);

	req = vmig_ctl_request("migrate");
	if (!req)
		return vmig__lv_fail(c, VIR_ERR_NO_MEMORY, "out of memory");
	if (mig_uri) {
		if (strncmp(mig_uri->v.s, "tcp://", 6) && strncmp(mig_uri->v.s, "unix:", 5)) {
			json_object_put(req);
			return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "migrate_uri '%s': "
					     "vmig takes tcp://HOST:PORT or unix:PATH there (a "
					     "'vmig incoming --listen' on the destination)",
					     mig_uri->v.s);
		}
		json_object_object_add(req, "uri", json_object_new_string(mig_uri->v.s));
	} else {
		struct dest d;
		const char *agent = getenv("SSH_AUTH_SOCK");

		if (!dconnuri) {
			json_object_put(req);
			return vmig__lv_fail(c, VIR_ERR_INVALID_ARG, "no destination URI");
		}
		if (parse_dconnuri(c, dconnuri, &d) < 0) {
			json_object_put(req);
			return -1;
		}
		json_object_object_add(req, "uri", json_object_new_string(d.vmig_uri));
		ssh = json_object_new_object();
		if (c->srv->remote_vmig)
			json_object_object_add(ssh, "remote_vmig",
					       json_object_new_string(c->srv->remote_vmig));
		if (dname)
			json_object_object_add(ssh, "dest_name", json_object_new_string(dname->v.s));
		if (d.known_hosts[0] || c->srv->known_hosts)
			json_object_object_add(ssh, "known_hosts", json_object_new_string(
				d.known_hosts[0] ? d.known_hosts : c->srv->known_hosts));
		if (d.keyfile[0] || c->srv->identity)
			json_object_object_add(ssh, "identity", json_object_new_string(
				d.keyfile[0] ? d.keyfile : c->srv->identity));
		json_object_object_add(ssh, "agent_socket", json_object_new_string(agent ? agent : ""));
		json_object_object_add(ssh, "accept_new_host_key", json_object_new_boolean(
			d.no_verify || c->srv->accept_new_host_key));
		json_object_object_add(req, "ssh", ssh);
	}
	if (dname && mig_uri) {
		json_object_put(req);
		return vmig__lv_fail(c, VIR_ERR_ARGUMENT_UNSUPPORTED, "with migrate_uri the VM "
				     "keeps its name; name it on the destination with "
				     "'vmig incoming --name'");
	}

	pthread_mutex_lock(&c->srv->lock);
	vs = vmig__lv_setting_locked(c->srv, name);
	if (vs) {
		speed = vs->max_speed_mibs;
		downtime = vs->max_downtime_ms;
	}
	pthread_mutex_unlock(&c->srv->lock);
	if (bw)
		speed = bw->v.ul;
	json_object_object_add(req, "max_downtime_ms", json_object_new_int64(
		downtime ? (int64_t)downtime : 300));
	json_object_object_add(req, "timeout_s", json_object_new_int64(0));
	json_object_object_add(req, "on_timeout", json_object_new_string("cancel"));
	/* Asked for: lz4 on every page; else vmig's default (lz4 while it pays). */
	if ((flags & VIR_MIGRATE_COMPRESSED) ||
	    param_find(p, np, VIR_MIGRATE_PARAM_COMPRESSION, VIR_TYPED_PARAM_STRING))
		json_object_object_add(req, "compress", json_object_new_string("lz4"));
	/* libvirt resumes a VM paused for a non-live migration unless told not to. */
	json_object_object_add(req, "resume", json_object_new_boolean(
		!(flags & VIR_MIGRATE_LIVE) && running && !(flags & VIR_MIGRATE_PAUSED)));
	if (speed)
		json_object_object_add(req, "bandwidth_bps", json_object_new_uint64(
			speed > UINT64_MAX / 1048576 ? UINT64_MAX : speed * 1048576));
	if (flags & VIR_MIGRATE_PARALLEL)
		json_object_object_add(req, "channels", json_object_new_int(par ? par->v.i : 2));
	/* vmig throttles a guest that outruns the link by default; say so. */
	if (flags & VIR_MIGRATE_AUTO_CONVERGE)
		json_object_object_add(req, "max_throttle", json_object_new_int(99));
	*out = req;
	return 0;
}

/* Send the migrate request and follow the VM's events to the result.
 * 0 once the destination runs the VM, or -1 with the call's error set. */
static int run_migration(struct lv_call *c, const char *name, struct json_object *req)
{
	struct vmig_ctl_reader rd;
	struct json_object *msg = NULL;
	struct lv_vm_setting *vs;
	char path[4200];
	const char *err = NULL, *status;
	int fd, ret;

	if (vm_sock(c->srv, name, path, sizeof(path)) < 0 || vmig_ctl_connect(path, &fd) < 0) {
		json_object_put(req);
		return vmig__lv_fail(c, VIR_ERR_NO_DOMAIN, "VM '%s' went away", name);
	}
	/* From here until the result, job statistics come from this call. */
	pthread_mutex_lock(&c->srv->lock);
	vs = vmig__lv_setting_locked(c->srv, name);
	if (vs && vs->migrating) {
		pthread_mutex_unlock(&c->srv->lock);
		json_object_put(req);
		close(fd);
		return vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "VM '%s' is already being "
				     "migrated", name);
	}
	if (vs) {
		vs->migrating = true;
		vs->mig_started_ms = now_ms();
		vs->progress = NULL;
	}
	pthread_mutex_unlock(&c->srv->lock);
	ret = vmig_ctl_send(fd, req);
	json_object_put(req);
	if (ret < 0) {
		close(fd);
		return vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot talk to VM '%s': %s",
				     name, strerror(-ret));
	}
	vmig_ctl_reader_init(&rd, fd);
	ret = vmig_ctl_recv(&rd, &msg);
	if (ret < 0) {
		vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "VM '%s' closed its control "
			      "connection: %s", name, strerror(-ret));
		goto out;
	}
	if (vmig_ctl_reply_status(msg, &err) < 0) {
		vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "VM '%s' refused to migrate: %s",
			      name, err ? err : "refused");
		ret = -1;
		goto out;
	}
	for (;;) {
		json_object_put(msg);
		msg = NULL;
		ret = vmig_ctl_recv(&rd, &msg);
		if (ret == -EINTR || ret == -EPROTO)
			continue;
		if (ret < 0) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "lost VM '%s' during the "
				      "migration: %s", name, strerror(-ret));
			goto out;
		}
		if (!strcmp(jstr(msg, "event", ""), "result"))
			break;
		if (!strcmp(jstr(msg, "event", ""), "progress") && vs) {
			/* What job statistics answer from now on. */
			pthread_mutex_lock(&c->srv->lock);
			json_object_put(vs->progress);
			vs->progress = json_object_get(msg);
			pthread_mutex_unlock(&c->srv->lock);
		}
	}
	status = jstr(msg, "status", "");
	err = jstr(msg, "error", "");
	vmig_log(VMIG_LOG_INFO, "libvirt: migration of %s: %s%s%s", name, status,
		 *err ? ": " : "", err);
	if (!strcmp(status, "completed")) {
		ret = 0;
		if (wait_gone(c->srv, name, 30000) < 0)
			vmig_log(VMIG_LOG_WARN, "libvirt: the VMM of '%s' did not exit after its "
				 "migration", name);
	} else if (!strcmp(status, "cancelled")) {
		ret = vmig__lv_fail(c, VIR_ERR_OPERATION_ABORTED, "migration out: canceled by "
				    "client; VM '%s' keeps running on this host", name);
	} else if (!strcmp(status, "handoff-uncertain")) {
		ret = vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "migration of '%s': handoff "
				    "uncertain: %s.  The VM is paused here and may run on the "
				    "destination: check there, then 'vmig resume --force %s' here "
				    "if it does not run there, or 'vmig stop %s' if it does",
				    name, err, name, name);
	} else {
		ret = vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "migration of '%s' %s: %s; "
				    "the VM keeps running on this host", name, status, err);
	}
out:
	if (vs) {
		pthread_mutex_lock(&c->srv->lock);
		vs->migrating = false;
		json_object_put(vs->progress);
		vs->progress = NULL;
		pthread_mutex_unlock(&c->srv->lock);
	}
	json_object_put(msg);
	vmig_ctl_reader_fini(&rd);
	close(fd);
	return ret < 0 ? -1 : 0;
}

static int p_migrate_perform3_params(struct lv_call *c)
{
	struct lv_param *params = NULL;
	char *dconnuri = NULL, *cookie = NULL;
	u_int nparams = 0, cookie_len = 0, flags = 0, zero = 0;
	struct json_object *req = NULL;
	bool decoded, running, paused_here = false;
	int ret = -1;

	{
		WITH_DOMAIN(true);
		decoded = vmig__lv_xdr_opt_string(&c->in, &dconnuri) &&
			  vmig__lv_xdr_params(&c->in, &params, &nparams) &&
			  xdr_bytes(&c->in, &cookie, &cookie_len, LV_COOKIE_MAX) &&
			  xdr_u_int(&c->in, &flags);
		if (!decoded) {
			bad_args(c);
			goto out;
		}
		if (!vm_active(st)) {
			vmig__lv_fail(c, VIR_ERR_OPERATION_INVALID, "domain '%s' is not running "
				      "(vmig migrates running VMs only)", dom.name);
			goto out;
		}
		running = !strcmp(jstr(st, "state", ""), "running");
		if (build_request(c, dom.name, dconnuri, params, nparams, flags, running, &req) < 0)
			goto out;
		vmig_log(VMIG_LOG_INFO, "libvirt: migrate %s to %s (flags 0x%x): %s", dom.name,
			 dconnuri ? dconnuri : "-", flags,
			 json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN |
							JSON_C_TO_STRING_NOSLASHESCAPE));
		if (!(flags & VIR_MIGRATE_LIVE) && running) {
			/* libvirt's non-live migration: the VM is paused throughout. */
			struct json_object *r = NULL;
			char msg[600];

			if (vm_call(c->srv, dom.name, "pause", NULL, &r, msg, sizeof(msg)) < 0) {
				vmig__lv_fail(c, VIR_ERR_OPERATION_FAILED, "cannot pause '%s' for "
					      "a non-live migration: %s", dom.name, msg);
				goto out;
			}
			json_object_put(r);
			paused_here = true;
		}
		ret = run_migration(c, dom.name, req);
		req = NULL;
		if (ret < 0 && paused_here) {
			struct json_object *r = NULL;

			vm_call(c->srv, dom.name, "resume", NULL, &r, NULL, 0);
			json_object_put(r);
		}
		if (ret == 0 && (flags & VIR_MIGRATE_UNDEFINE_SOURCE) && st_persistent(st)) {
			/* The VM left: its definition here goes too, as asked. */
			char path[4200];

			pthread_mutex_lock(&c->srv->defs_lock);
			if (def_path(c->srv, dom.name, path, sizeof(path)) == 0 && unlink(path) == 0) {
				fsync_dir(c->srv->config_dir);
				vmig_log(VMIG_LOG_INFO, "libvirt: undefined %s (migrated away with "
					 "--undefinesource)", dom.name);
			}
			pthread_mutex_unlock(&c->srv->defs_lock);
		}
		if (ret == 0 && !xdr_u_int(&c->out, &zero))     /* no cookie out */
			ret = vmig__lv_fail(c, VIR_ERR_RPC, "reply too large");
out:
		json_object_put(req);
		vmig__lv_params_free(params, nparams);
		free(dconnuri);
		free(cookie);
		DONE(ret);
	}
}

/* ------------------------------------------------------------------------
 * The table
 */

static const struct proc {
	int num;
	const char *name;
	int (*fn)(struct lv_call *c);
} procs[] = {
	{ P_CONNECT_OPEN, "connect-open", p_connect_open },
	{ P_CONNECT_CLOSE, "connect-close", p_connect_close },
	{ P_CONNECT_GET_TYPE, "connect-get-type", p_get_type },
	{ P_CONNECT_GET_VERSION, "connect-get-version", p_get_version },
	{ P_CONNECT_GET_MAX_VCPUS, "connect-get-max-vcpus", p_get_max_vcpus },
	{ P_NODE_GET_INFO, "node-get-info", p_node_get_info },
	{ P_CONNECT_GET_CAPABILITIES, "connect-get-capabilities", p_get_capabilities },
	{ P_DOMAIN_CREATE, "domain-create", p_start },
	{ P_DOMAIN_CREATE_XML, "domain-create-xml", p_create_xml },
	{ P_DOMAIN_DEFINE_XML, "domain-define-xml", p_define_xml },
	{ P_DOMAIN_DESTROY, "domain-destroy", p_destroy },
	{ P_DOMAIN_GET_XML_DESC, "domain-get-xml-desc", p_get_xml_desc },
	{ P_DOMAIN_GET_AUTOSTART, "domain-get-autostart", p_domain_const },
	{ P_DOMAIN_GET_INFO, "domain-get-info", p_get_info },
	{ P_DOMAIN_GET_MAX_MEMORY, "domain-get-max-memory", p_domain_const },
	{ P_DOMAIN_GET_MAX_VCPUS, "domain-get-max-vcpus", p_domain_const },
	{ P_DOMAIN_GET_OS_TYPE, "domain-get-os-type", p_domain_const },
	{ P_CONNECT_LIST_DEFINED_DOMAINS, "connect-list-defined-domains", p_list_defined },
	{ P_DOMAIN_LOOKUP_BY_ID, "domain-lookup-by-id", p_lookup_by_id },
	{ P_DOMAIN_LOOKUP_BY_NAME, "domain-lookup-by-name", p_lookup_by_name },
	{ P_DOMAIN_LOOKUP_BY_UUID, "domain-lookup-by-uuid", p_lookup_by_uuid },
	{ P_CONNECT_NUM_OF_DEFINED_DOMAINS, "connect-num-of-defined-domains", p_num_defined },
	{ P_DOMAIN_RESUME, "domain-resume", p_resume },
	{ P_DOMAIN_SHUTDOWN, "domain-shutdown", p_shutdown },
	{ P_DOMAIN_SUSPEND, "domain-suspend", p_suspend },
	{ P_DOMAIN_UNDEFINE, "domain-undefine", p_undefine },
	{ P_CONNECT_LIST_DOMAINS, "connect-list-domains", p_list_domains },
	{ P_CONNECT_NUM_OF_DOMAINS, "connect-num-of-domains", p_num_of_domains },
	{ P_CONNECT_GET_HOSTNAME, "connect-get-hostname", p_get_hostname },
	{ P_CONNECT_SUPPORTS_FEATURE, "connect-supports-feature", p_supports_feature },
	{ P_AUTH_LIST, "auth-list", p_auth_list },
	{ P_CONNECT_GET_URI, "connect-get-uri", p_get_uri },
	{ P_CONNECT_IS_SECURE, "connect-is-secure", p_is_secure },
	{ P_DOMAIN_IS_ACTIVE, "domain-is-active", p_domain_const },
	{ P_DOMAIN_IS_PERSISTENT, "domain-is-persistent", p_domain_const },
	{ P_CONNECT_GET_LIB_VERSION, "connect-get-lib-version", p_get_lib_version },
	{ P_DOMAIN_GET_JOB_INFO, "domain-get-job-info", p_get_job_info },
	{ P_DOMAIN_ABORT_JOB, "domain-abort-job", p_abort_job },
	{ P_DOMAIN_MIGRATE_SET_MAX_DOWNTIME, "domain-migrate-set-max-downtime", p_set_max_downtime },
	{ P_DOMAIN_HAS_MANAGED_SAVE_IMAGE, "domain-has-managed-save-image", p_domain_flags_const },
	{ P_DOMAIN_CREATE_WITH_FLAGS, "domain-create-with-flags", p_start },
	{ P_DOMAIN_GET_VCPUS_FLAGS, "domain-get-vcpus-flags", p_domain_flags_const },
	{ P_DOMAIN_IS_UPDATED, "domain-is-updated", p_domain_const },
	{ P_DOMAIN_MIGRATE_SET_MAX_SPEED, "domain-migrate-set-max-speed", p_set_max_speed },
	{ P_DOMAIN_GET_STATE, "domain-get-state", p_get_state },
	{ P_DOMAIN_GET_CONTROL_INFO, "domain-get-control-info", p_get_control_info },
	{ P_DOMAIN_UNDEFINE_FLAGS, "domain-undefine-flags", p_undefine },
	{ P_DOMAIN_DESTROY_FLAGS, "domain-destroy-flags", p_destroy },
	{ P_DOMAIN_MIGRATE_GET_MAX_SPEED, "domain-migrate-get-max-speed", p_get_max_speed },
	{ P_DOMAIN_SHUTDOWN_FLAGS, "domain-shutdown-flags", p_shutdown },
	{ P_CONNECT_LIST_ALL_DOMAINS, "connect-list-all-domains", p_list_all_domains },
	{ P_DOMAIN_GET_JOB_STATS, "domain-get-job-stats", p_get_job_stats },
	{ P_DOMAIN_MIGRATE_PERFORM3_PARAMS, "domain-migrate-perform3-params",
	  p_migrate_perform3_params },
	{ P_DOMAIN_DEFINE_XML_FLAGS, "domain-define-xml-flags", p_define_xml },
};

static const struct proc *find_proc(int num)
{
	size_t i;

	for (i = 0; i < sizeof(procs) / sizeof(procs[0]); i++)
		if (procs[i].num == num)
			return &procs[i];
	return NULL;
}

const char *vmig__lv_proc_name(int num)
{
	const struct proc *p = find_proc(num);

	return p ? p->name : "an unknown procedure";
}

int vmig__lv_dispatch(struct lv_call *c)
{
	const struct proc *p = find_proc(c->hdr.proc);

	if (!p) {
		vmig_log(VMIG_LOG_INFO, "libvirt: procedure %d is not served", c->hdr.proc);
		return vmig__lv_fail(c, VIR_ERR_NO_SUPPORT, "vmig's libvirt endpoint does "
				     "not serve remote procedure %d", c->hdr.proc);
	}
	vmig_log(VMIG_LOG_DEBUG, "libvirt: %s", p->name);
	return p->fn(c);
}
