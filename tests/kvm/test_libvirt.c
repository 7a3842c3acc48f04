/*
 * vmig libvirt-serve against Debian's real virsh and libvirt client
 * library: two endpoints on this host, process to process.
 *
 * "Host A" and "host B" are two run directories, each with its own
 * `vmig libvirt-serve --socket DIR/X.sock`; virsh reaches them as
 * vmig+unix:///system?socket=DIR/X.sock.  Peer-to-peer migrations go from
 * A's endpoint to B over a real OpenSSH sshd on 127.0.0.1 that the test
 * starts with keys it makes (as in test_ssh.c): the destination URI is
 * vmig+ssh://USER@127.0.0.1:PORT/system?socket=B.sock&keyfile=...&
 * known_hosts=..., and A's endpoint runs with --remote-vmig naming a
 * wrapper that sets VMIG_RUN_DIR to B (sshd passes no environment).
 *
 * Every endpoint keeps its definitions (virsh define) in DIR/defs-TAG, given
 * with --config-dir.
 *
 * The malformed-packet tests talk raw to an endpoint, packets built with
 * libvirt/proto.c, and check that the endpoint answers with an error or
 * closes the connection, and still serves afterwards.
 *
 * Skips (77) without /dev/kvm, virsh or sshd.
 */
#include "config.h"

#include <inttypes.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <json-c/json.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include "kvm-test.h"
#include "proc-test.h"
#include "../../libvirt/libvirt-internal.h"

#define SSHD       KVM_TEST_SSHD
#define SSH_KEYGEN KVM_TEST_SSH_KEYGEN
#define VIRSH      "/usr/bin/virsh"

static const char *vmig_bin;
static char lv_client[4096];
static char base[128];
static char dir[256];
static char run_a[300], run_b[300];
static char sock_a[300], sock_b[300];
static char uri_a[400], uri_b[400];
static char known_hosts[300], user_key[300], rvmig_b[300];
static char dest_uri[1400];
static struct kvm_test_sshd sshd;
static pid_t serve_a, serve_b;

static void run_list(struct kvm_test_result *r, const char *run_dir, const char *first,
		     const char *second, const char *third, const char *const *args)
{
	const char *argv[48];
	unsigned int i = 0;

	argv[i++] = first;
	if (second)
		argv[i++] = second;
	if (third)
		argv[i++] = third;
	while (*args && i < 47)
		argv[i++] = *args++;
	argv[i] = NULL;
	kvm_test_run_argv(r, &(struct kvm_test_proc){ .run_dir = run_dir }, argv);
}

#define VMIG_A(r, ...) run_list((r), run_a, vmig_bin, NULL, NULL, (const char *const[]){ __VA_ARGS__, NULL })
#define VMIG_B(r, ...) run_list((r), run_b, vmig_bin, NULL, NULL, (const char *const[]){ __VA_ARGS__, NULL })
#define VIRSH_A(r, ...) run_list((r), NULL, VIRSH, "-c", uri_a, (const char *const[]){ __VA_ARGS__, NULL })
#define VIRSH_B(r, ...) run_list((r), NULL, VIRSH, "-c", uri_b, (const char *const[]){ __VA_ARGS__, NULL })

static void start_vm(const char *name, const char *mem, const char *workload)
{
	kvm_test_start_vm(run_a, name, mem, "2", workload);
}

/* ------------------------------------------------------------------------
 * sshd and the endpoints
 */

/* Connect to an endpoint's socket; -1 if nothing answers. */
static int connect_to(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Start `vmig libvirt-serve` for @run_dir on @sock, log in DIR/serve-@tag.log,
 * definitions in DIR/defs-@tag. */
static pid_t start_endpoint(const char *run_dir, const char *sock, const char *tag, bool ssh)
{
	char log[400], pidf[400], num[32], text[4096], defs[400];
	struct kvm_test_proc how = { .run_dir = run_dir, .env = KVM_TEST_ARGS("VMIG_LOG=info"),
				     .out_path = log, .err_path = log };
	uint64_t end = kvm_test_now_ms() + 10000;
	pid_t pid;

	snprintf(log, sizeof(log), "%s/serve-%s.log", dir, tag);
	snprintf(defs, sizeof(defs), "%s/defs-%s", dir, tag);
	if (ssh)
		kvm_test_spawn(&how, KVM_TEST_ARGS(vmig_bin, "libvirt-serve", "--socket", sock,
						   "--config-dir", defs, "--remote-vmig", rvmig_b));
	else
		kvm_test_spawn(&how, KVM_TEST_ARGS(vmig_bin, "libvirt-serve", "--socket", sock,
						   "--config-dir", defs));
	pid = how.pid;
	snprintf(pidf, sizeof(pidf), "%s/serve-%s.pid", dir, tag);
	snprintf(num, sizeof(num), "%d\n", (int)pid);
	kvm_test_write_file(pidf, num, 0600);
	for (;;) {
		int c = connect_to(sock);

		if (c >= 0) {
			close(c);
			break;
		}
		if (waitpid(pid, NULL, WNOHANG) != 0) {
			kvm_test_read_file(log, text, sizeof(text));
			ck_abort_msg("libvirt-serve exited at start: %s", text);
		}
		ck_assert_msg(kvm_test_now_ms() < end, "libvirt-serve does not answer on %s", sock);
		kvm_test_sleep_ms(20);
	}
	return pid;
}

static void serve_log(const char *tag, char *buf, size_t len)
{
	char path[400];

	snprintf(path, sizeof(path), "%s/serve-%s.log", dir, tag);
	kvm_test_read_file(path, buf, len);
}

static void setup_common(void)
{
	vmig_bin = kvm_test_vmig_bin();
	kvm_test_make_dirs(base, dir, sizeof(dir), run_a, run_b, sizeof(run_a));
	snprintf(sock_a, sizeof(sock_a), "%s/a.sock", dir);
	snprintf(sock_b, sizeof(sock_b), "%s/b.sock", dir);
	snprintf(uri_a, sizeof(uri_a), "vmig+unix:///system?socket=%s", sock_a);
	snprintf(uri_b, sizeof(uri_b), "vmig+unix:///system?socket=%s", sock_b);
	/* virsh's own files (history, cache) go there, not to the user's. */
	setenv("HOME", dir, 1);
	unsetenv("SSH_AUTH_SOCK");
	unsetenv("LIBVIRT_DEFAULT_URI");
}

static void setup_local(void)
{
	setup_common();
	serve_a = start_endpoint(run_a, sock_a, "a", false);
}

static void setup_migration(void)
{
	struct passwd *pw = getpwuid(geteuid());
	char text[1200];

	ck_assert_ptr_nonnull(pw);
	setup_common();
	snprintf(known_hosts, sizeof(known_hosts), "%s/known_hosts", dir);
	snprintf(user_key, sizeof(user_key), "%s/id_user", dir);
	snprintf(rvmig_b, sizeof(rvmig_b), "%s/vmig-on-b", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nVMIG_RUN_DIR=%s; export VMIG_RUN_DIR\n"
		 "exec %s \"$@\"\n", run_b, vmig_bin);
	kvm_test_write_file(rvmig_b, text, 0755);
	kvm_test_keygen(user_key);
	kvm_test_sshd_start(&sshd, dir, dir, NULL);      /* makes the host key */
	kvm_test_sshd_authorize(&sshd, user_key);
	kvm_test_sshd_trust(&sshd, known_hosts, false);
	snprintf(dest_uri, sizeof(dest_uri),
		 "vmig+ssh://%s@127.0.0.1:%d/system?socket=%s&keyfile=%s&known_hosts=%s",
		 pw->pw_name, sshd.port, sock_b, user_key, known_hosts);
	serve_a = start_endpoint(run_a, sock_a, "a", true);
	serve_b = start_endpoint(run_b, sock_b, "b", false);
}

static void teardown(void)
{
	pid_t *p[] = { &serve_a, &serve_b };
	unsigned int i;

	for (i = 0; i < 2; i++) {
		if (*p[i] > 0) {
			kill(*p[i], SIGTERM);
			waitpid(*p[i], NULL, 0);
			*p[i] = 0;
		}
	}
	kvm_test_sshd_stop(&sshd);
	kvm_test_reap(dir);
}

static void runner_setup(void)
{
	kvm_test_make_base(base, sizeof(base), "lv");
}

static void runner_teardown(void)
{
	kvm_test_reap(base);
}

/* A line of virsh's table output for VM @name, or NULL. */
static const char *line_of(const char *out, const char *name)
{
	const char *p = out;
	size_t n = strlen(name);

	while ((p = strstr(p, name))) {
		if ((p == out || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n'))
			return p;
		p += n;
	}
	return NULL;
}

/* ------------------------------------------------------------------------
 * virsh: list, dominfo, dumpxml, suspend/resume, destroy
 */

START_TEST(virsh_list_info_control)
{
	struct json_object *o;
	struct kvm_test_result r;
	char want[64];
	const char *l;

	start_vm("lv1", "96M", "rate=2000,wss=4M");
	o = kvm_test_vm_status(run_a, "lv1");

	VIRSH_A(&r, "list");
	ck_assert_msg(r.status == 0, "virsh list: %d %s", r.status, r.err);
	l = line_of(r.out, "lv1");
	ck_assert_msg(l && !strncmp(l + 3, "  ", 2) && strstr(l, "running"),
		      "virsh list: %s", r.out);
	snprintf(want, sizeof(want), " %s ", json_object_get_string(json_object_object_get(o, "pid")));
	ck_assert_msg(strstr(r.out, want), "the id is not the pid %s: %s", want, r.out);
	json_object_put(o);

	VIRSH_A(&r, "dominfo", "lv1");
	ck_assert_msg(r.status == 0, "virsh dominfo: %s", r.err);
	ck_assert_msg(strstr(r.out, "State:          running"), "dominfo: %s", r.out);
	ck_assert_msg(strstr(r.out, "CPU(s):         2"), "dominfo: %s", r.out);
	ck_assert_msg(strstr(r.out, "Max memory:     98304 KiB"), "dominfo: %s", r.out);
	ck_assert_msg(strstr(r.out, "Persistent:     no"), "dominfo: %s", r.out);

	VIRSH_A(&r, "dumpxml", "lv1");
	ck_assert_msg(r.status == 0, "virsh dumpxml: %s", r.err);
	ck_assert_msg(strstr(r.out, "<name>lv1</name>") &&
		      strstr(r.out, "<memory unit='KiB'>98304</memory>") &&
		      strstr(r.out, "<vcpu placement='static'>2</vcpu>") &&
		      strstr(r.out, "xmlns:vmig='https://vmig.dev/xmlns/libvirt/domain/1'") &&
		      strstr(r.out, "<vmig:workload>rate=2000,wss=4M</vmig:workload>"),
		      "dumpxml: %s", r.out);

	/* Lookups by UUID and id find the same VM. */
	VIRSH_A(&r, "domuuid", "lv1");
	ck_assert_int_eq(r.status, 0);
	*strchrnul(r.out, '\n') = 0;
	{
		char uuid[64];

		snprintf(uuid, sizeof(uuid), "%.40s", r.out);
		VIRSH_A(&r, "domname", uuid);
		ck_assert_msg(r.status == 0 && !strncmp(r.out, "lv1\n", 4), "domname %s: %s %s",
			      uuid, r.out, r.err);
	}

	VIRSH_A(&r, "suspend", "lv1");
	ck_assert_msg(r.status == 0, "virsh suspend: %s", r.err);
	o = kvm_test_vm_status(run_a, "lv1");
	ck_assert_str_eq(kvm_test_vm_state(o), "paused");
	json_object_put(o);
	VIRSH_A(&r, "domstate", "--reason", "lv1");
	ck_assert_msg(strstr(r.out, "paused (user)"), "domstate: %s", r.out);
	VIRSH_A(&r, "resume", "lv1");
	ck_assert_msg(r.status == 0, "virsh resume: %s", r.err);
	kvm_test_assert_guest_runs(run_a, "lv1");

	/* Not served: libvirt's "not supported", and the endpoint goes on. */
	VIRSH_A(&r, "setmem", "lv1", "32M");
	ck_assert_int_ne(r.status, 0);
	ck_assert_msg(strstr(r.err, "not supported"), "setmem said: %s", r.err);
	VIRSH_A(&r, "domjobinfo", "lv1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "None"), "domjobinfo: %s %s", r.out, r.err);

	VIRSH_A(&r, "destroy", "lv1");
	ck_assert_msg(r.status == 0, "virsh destroy: %s", r.err);
	ck_assert(!kvm_test_exists_in(run_a, "lv1", "sock"));
	VIRSH_A(&r, "list", "--all");
	ck_assert_msg(r.status == 0 && !line_of(r.out, "lv1"), "after destroy: %s", r.out);
	VIRSH_A(&r, "dominfo", "lv1");
	ck_assert_msg(r.status != 0 && strstr(r.err, "failed to get domain"), "dominfo: %s", r.err);

	/* shutdown asks the guest, which powers itself off; the VM goes. */
	start_vm("lv1s", "64M", "rate=1000,wss=4M");
	VIRSH_A(&r, "shutdown", "lv1s");
	ck_assert_msg(r.status == 0, "virsh shutdown: %s %s", r.out, r.err);
	{
		uint64_t end = kvm_test_now_ms() + 20000;

		while (kvm_test_exists_in(run_a, "lv1s", "sock") && kvm_test_now_ms() < end)
			kvm_test_sleep_ms(50);
	}
	ck_assert_msg(!kvm_test_exists_in(run_a, "lv1s", "sock"), "the guest did not shut down");
	VIRSH_A(&r, "list", "--all");
	ck_assert_msg(r.status == 0 && !line_of(r.out, "lv1s"), "after shutdown: %s", r.out);

	/* A vmig incoming waiting for its VM answers status, but is no domain. */
	VMIG_A(&r, "incoming", "--listen", "tcp://127.0.0.1:0", "--name", "lvwait", "--detach");
	ck_assert_msg(r.status == 0, "incoming: %s", r.err);
	VIRSH_A(&r, "list", "--all");
	ck_assert_msg(r.status == 0 && !line_of(r.out, "lvwait"), "a waiting listener: %s", r.out);
	VIRSH_A(&r, "dominfo", "lvwait");
	ck_assert_int_ne(r.status, 0);
	VMIG_A(&r, "stop", "lvwait");
	ck_assert_msg(r.status == 0, "stop: %s", r.err);
}
END_TEST

/* virsh create: a VM from domain XML, and dumpxml's XML starts a twin. */
START_TEST(virsh_create_from_xml)
{
	struct json_object *o;
	struct kvm_test_result r;
	char path[400], *p;

	snprintf(path, sizeof(path), "%s/lv6.xml", dir);
	kvm_test_write_file(path, "<domain type='kvm'>\n"
		   "  <name>lv6</name>\n"
		   "  <metadata><vmig:vm xmlns:vmig='https://vmig.dev/xmlns/libvirt/domain/1'>"
		   "<vmig:workload>rate=500,wss=1M</vmig:workload></vmig:vm></metadata>\n"
		   "  <memory unit='MiB'>48</memory>\n"
		   "  <vcpu placement='static'>2</vcpu>\n"
		   "  <os><type arch='x86_64'>hvm</type></os>\n"
		   "</domain>\n", 0600);
	VIRSH_A(&r, "create", path);
	ck_assert_msg(r.status == 0, "virsh create: %s %s", r.out, r.err);
	o = kvm_test_vm_status(run_a, "lv6");
	ck_assert_uint_eq(json_object_get_uint64(json_object_object_get(o, "memory")), 48u << 20);
	ck_assert_uint_eq(json_object_get_uint64(json_object_object_get(o, "vcpus")), 2);
	ck_assert_str_eq(json_object_get_string(json_object_object_get(o, "workload")),
			 "rate=500,wss=1M");
	json_object_put(o);
	kvm_test_assert_guest_runs(run_a, "lv6");
	VIRSH_A(&r, "create", path);
	ck_assert_msg(r.status != 0 && strstr(r.err, "already exists"), "twice: %s", r.err);

	/* dumpxml's output, renamed, starts the same VM paused. */
	VIRSH_A(&r, "dumpxml", "lv6");
	ck_assert_int_eq(r.status, 0);
	p = strstr(r.out, "<name>lv6</name>");
	ck_assert_ptr_nonnull(p);
	p[8] = '7';
	kvm_test_write_file(path, r.out, 0600);
	VIRSH_A(&r, "create", "--paused", path);
	ck_assert_msg(r.status == 0, "virsh create --paused: %s", r.err);
	o = kvm_test_vm_status(run_a, "lv7");
	ck_assert_str_eq(kvm_test_vm_state(o), "paused");
	ck_assert_uint_eq(json_object_get_uint64(json_object_object_get(o, "memory")), 48u << 20);
	json_object_put(o);

	/* What vmig cannot build is refused, with vmig's reason. */
	kvm_test_write_file(path, "<domain type='kvm'><name>lv8</name><memory>65536</memory>"
		   "<os><kernel>/nonexistent/bzImage</kernel></os></domain>", 0600);
	VIRSH_A(&r, "create", path);
	ck_assert_msg(r.status != 0 && strstr(r.err, "/nonexistent/bzImage"), "kernel: %s", r.err);
	kvm_test_write_file(path, "<domain type='kvm'><name>lv8</name><memory>65536</memory>"
		   "<devices><disk type='file'/></devices></domain>", 0600);
	VIRSH_A(&r, "create", path);
	ck_assert_msg(r.status != 0 && strstr(r.err, "no disks"), "disk: %s", r.err);
	ck_assert(!kvm_test_exists_in(run_a, "lv8", "sock"));
	VIRSH_A(&r, "destroy", "lv6");
	ck_assert_int_eq(r.status, 0);
	VIRSH_A(&r, "destroy", "lv7");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/* ------------------------------------------------------------------------
 * Persistent definitions: define, start, destroy, undefine
 */

static const char lpd_xml[] =
	"<domain type='kvm'>\n"
	"  <name>lpd1</name>\n"
	"  <metadata><vmig:vm xmlns:vmig='https://vmig.dev/xmlns/libvirt/domain/1'>"
	"<vmig:workload>rate=500,wss=1M</vmig:workload></vmig:vm></metadata>\n"
	"  <memory unit='MiB'>48</memory>\n"
	"  <vcpu placement='static'>2</vcpu>\n"
	"  <os><type arch='x86_64'>hvm</type></os>\n"
	"</domain>\n";

/* virsh list @flag (NULL: running only) shows lpd1 in @state, or not (NULL). */
static void assert_listed(const char *flag, const char *name, const char *state)
{
	struct kvm_test_result r;
	const char *l;

	if (flag)
		VIRSH_A(&r, "list", flag);
	else
		VIRSH_A(&r, "list");
	ck_assert_msg(r.status == 0, "virsh list %s: %s", flag ? flag : "", r.err);
	l = line_of(r.out, name);
	if (!state) {
		ck_assert_msg(!l, "virsh list %s shows %s: %s", flag ? flag : "", name, r.out);
		return;
	}
	ck_assert_msg(l && !strncmp(strchrnul(l, '\n') - strlen(state), state, strlen(state)),
		      "virsh list %s: %s is not %s: %s", flag ? flag : "", name, state, r.out);
}

START_TEST(virsh_define_start_undefine)
{
	char xml[400], def[400], text[4096], uuid[64];
	struct kvm_test_result r;
	struct json_object *o;
	pid_t old;
	char *p;

	snprintf(xml, sizeof(xml), "%s/lpd1.xml", dir);
	snprintf(def, sizeof(def), "%s/defs-a/lpd1.xml", dir);
	kvm_test_write_file(xml, lpd_xml, 0600);

	/* define: a file in the config directory, the XML with a UUID added. */
	VIRSH_A(&r, "define", xml);
	ck_assert_msg(r.status == 0 && strstr(r.out, "Domain 'lpd1' defined"), "virsh define: "
		      "%d %s %s", r.status, r.out, r.err);
	kvm_test_read_file(def, text, sizeof(text));
	ck_assert_msg(strstr(text, "<name>lpd1</name>") && strstr(text, "<uuid>"),
		      "the definition %s: %s", def, text);
	ck_assert(!kvm_test_exists_in(run_a, "lpd1", "sock"));
	assert_listed("--all", "lpd1", "shut off");
	assert_listed("--inactive", "lpd1", "shut off");
	assert_listed(NULL, "lpd1", NULL);
	VIRSH_A(&r, "list", "--all", "--persistent");
	ck_assert_msg(r.status == 0 && line_of(r.out, "lpd1"), "--persistent: %s", r.out);
	VIRSH_A(&r, "list", "--all", "--transient");
	ck_assert_msg(r.status == 0 && !line_of(r.out, "lpd1"), "--transient: %s", r.out);
	run_list(&r, NULL, lv_client, "defined", uri_a, (const char *const[]){ NULL });
	ck_assert_msg(r.status == 0 && strstr(r.out, "num=1 names=lpd1,"), "old API: %d %s %s",
		      r.status, r.out, r.err);

	VIRSH_A(&r, "dominfo", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "State:          shut off") &&
		      strstr(r.out, "Id:             -") &&
		      strstr(r.out, "Persistent:     yes") && strstr(r.out, "CPU(s):         2") &&
		      strstr(r.out, "Max memory:     49152 KiB") &&
		      strstr(r.out, "Autostart:      disable"), "dominfo: %s %s", r.out, r.err);
	VIRSH_A(&r, "domuuid", "lpd1");
	ck_assert_int_eq(r.status, 0);
	snprintf(uuid, sizeof(uuid), "%.36s", r.out);
	ck_assert_msg(strlen(uuid) == 36, "domuuid: %s", r.out);

	/* dumpxml of the inactive domain: the XML as defined, with its UUID. */
	VIRSH_A(&r, "dumpxml", "lpd1");
	snprintf(text, sizeof(text), "<uuid>%s</uuid>", uuid);
	ck_assert_msg(r.status == 0 && strstr(r.out, "<name>lpd1</name>") &&
		      strstr(r.out, "<memory unit='MiB'>48</memory>") &&
		      strstr(r.out, "<vcpu placement='static'>2</vcpu>") && strstr(r.out, text) &&
		      strstr(r.out, "<vmig:workload>rate=500,wss=1M</vmig:workload>"),
		      "dumpxml: %s %s", r.out, r.err);
	/* ... which, renamed, is refused: the UUID is taken. */
	p = strstr(r.out, "<name>lpd1</name>");
	p[9] = '2';
	kvm_test_write_file(xml, r.out, 0600);
	VIRSH_A(&r, "define", xml);
	ck_assert_msg(r.status != 0 && strstr(r.err, "already has UUID"), "same UUID: %s", r.err);
	ck_assert_msg(r.status != 0 && strstr(r.err, "not valid"), "same UUID: %s", r.err);

	/* The same name twice; bad XML; a name taken by a running VM. */
	kvm_test_write_file(xml, lpd_xml, 0600);
	VIRSH_A(&r, "define", xml);
	ck_assert_msg(r.status != 0 && strstr(r.err, "domain 'lpd1' is already defined"),
		      "twice: %s", r.err);
	VIRSH_A(&r, "create", xml);
	ck_assert_msg(r.status != 0 && strstr(r.err, "already defined"), "create: %s", r.err);
	kvm_test_write_file(xml, "<domain type='kvm'><name>lpd3</name><vcpu>0</vcpu>"
			    "<memory unit='MiB'>32</memory></domain>", 0600);
	VIRSH_A(&r, "define", xml);
	ck_assert_msg(r.status != 0 && strstr(r.err, "XML error") && strstr(r.err, "<vcpu>"),
		      "bad vcpu: %s", r.err);
	snprintf(text, sizeof(text), "%s/defs-a/lpd3.xml", dir);
	ck_assert_msg(access(text, F_OK) < 0, "a refused definition was written");
	start_vm("lpd4", "32M", "rate=500,wss=1M");
	kvm_test_write_file(xml, "<domain type='kvm'><name>lpd4</name>"
			    "<memory unit='MiB'>32</memory></domain>", 0600);
	VIRSH_A(&r, "define", xml);
	ck_assert_msg(r.status != 0 && strstr(r.err, "domain 'lpd4' is already running"),
		      "running: %s", r.err);
	VIRSH_A(&r, "undefine", "lpd4");
	ck_assert_msg(r.status != 0 && strstr(r.err, "transient"), "undefine lpd4: %s", r.err);
	VIRSH_A(&r, "destroy", "lpd4");
	ck_assert_int_eq(r.status, 0);

	/* start: the VM runs as defined, and stays defined. */
	VIRSH_A(&r, "start", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "Domain 'lpd1' started"), "virsh start: "
		      "%d %s %s", r.status, r.out, r.err);
	o = kvm_test_vm_status(run_a, "lpd1");
	ck_assert_uint_eq(json_object_get_uint64(json_object_object_get(o, "memory")), 48u << 20);
	ck_assert_uint_eq(json_object_get_uint64(json_object_object_get(o, "vcpus")), 2);
	ck_assert_str_eq(json_object_get_string(json_object_object_get(o, "workload")),
			 "rate=500,wss=1M");
	json_object_put(o);
	kvm_test_assert_guest_runs(run_a, "lpd1");
	VIRSH_A(&r, "dominfo", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "State:          running") &&
		      strstr(r.out, "Persistent:     yes") && strstr(r.out, uuid),
		      "dominfo running: %s %s", r.out, r.err);
	assert_listed(NULL, "lpd1", "running");
	VIRSH_A(&r, "start", "lpd1");
	ck_assert_msg(r.status != 0 && strstr(r.err, "already active"), "start twice: %s", r.err);
	/* dumpxml --inactive: the definition; plain: the running VM. */
	VIRSH_A(&r, "dumpxml", "--inactive", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "<memory unit='MiB'>48</memory>") &&
		      !strstr(r.out, "vmig:pid"), "dumpxml --inactive: %s", r.out);
	VIRSH_A(&r, "dumpxml", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "vmig:pid") && strstr(r.out, uuid),
		      "dumpxml running: %s", r.out);

	/* destroy: shut off again, still defined. */
	VIRSH_A(&r, "destroy", "lpd1");
	ck_assert_msg(r.status == 0, "virsh destroy: %s", r.err);
	ck_assert(!kvm_test_exists_in(run_a, "lpd1", "sock"));
	assert_listed("--all", "lpd1", "shut off");
	VIRSH_A(&r, "destroy", "lpd1");
	ck_assert_msg(r.status != 0 && strstr(r.err, "not running"), "destroy twice: %s", r.err);

	/* start --paused (create-with-flags), then destroy. */
	VIRSH_A(&r, "start", "--paused", "lpd1");
	ck_assert_msg(r.status == 0, "virsh start --paused: %s", r.err);
	o = kvm_test_vm_status(run_a, "lpd1");
	ck_assert_str_eq(kvm_test_vm_state(o), "paused");
	json_object_put(o);
	VIRSH_A(&r, "destroy", "lpd1");
	ck_assert_int_eq(r.status, 0);

	/* A guest that powers itself off (virsh shutdown): shut off, defined. */
	VIRSH_A(&r, "start", "lpd1");
	ck_assert_int_eq(r.status, 0);
	VIRSH_A(&r, "shutdown", "lpd1");
	ck_assert_msg(r.status == 0, "virsh shutdown: %s %s", r.out, r.err);
	{
		uint64_t end = kvm_test_now_ms() + 20000;

		while (kvm_test_exists_in(run_a, "lpd1", "sock") && kvm_test_now_ms() < end)
			kvm_test_sleep_ms(50);
	}
	ck_assert_msg(!kvm_test_exists_in(run_a, "lpd1", "sock"), "the guest did not shut down");
	assert_listed("--all", "lpd1", "shut off");

	/* A new libvirt-serve finds the definition. */
	old = serve_a;
	kill(old, SIGTERM);
	ck_assert_int_eq(waitpid(old, NULL, 0), old);
	serve_a = start_endpoint(run_a, sock_a, "a", false);
	assert_listed("--all", "lpd1", "shut off");
	VIRSH_A(&r, "domuuid", "lpd1");
	ck_assert_msg(r.status == 0 && !strncmp(r.out, uuid, 36), "UUID after restart: %s %s",
		      r.out, r.err);

	/* undefine: gone, the file too. */
	VIRSH_A(&r, "undefine", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "undefined"), "virsh undefine: %s %s",
		      r.out, r.err);
	ck_assert_msg(access(def, F_OK) < 0, "%s is still there", def);
	assert_listed("--all", "lpd1", NULL);
	VIRSH_A(&r, "dominfo", "lpd1");
	ck_assert_msg(r.status != 0 && strstr(r.err, "failed to get domain"), "dominfo: %s", r.err);

	/* Undefined while running: it runs on, transient, and goes when destroyed. */
	kvm_test_write_file(xml, lpd_xml, 0600);
	VIRSH_A(&r, "define", xml);
	ck_assert_int_eq(r.status, 0);
	VIRSH_A(&r, "start", "lpd1");
	ck_assert_int_eq(r.status, 0);
	VIRSH_A(&r, "undefine", "lpd1");
	ck_assert_msg(r.status == 0, "undefine running: %s", r.err);
	kvm_test_assert_guest_runs(run_a, "lpd1");
	VIRSH_A(&r, "dominfo", "lpd1");
	ck_assert_msg(r.status == 0 && strstr(r.out, "Persistent:     no") &&
		      strstr(r.out, "State:          running"), "transient: %s", r.out);
	VIRSH_A(&r, "destroy", "lpd1");
	ck_assert_int_eq(r.status, 0);
	assert_listed("--all", "lpd1", NULL);
}
END_TEST

/* ------------------------------------------------------------------------
 * Malformed packets
 */

static bool xdr_name_arg(XDR *x, void *arg)
{
	return vmig__lv_xdr_string(x, (char **)&arg);
}

static size_t packet(char *buf, size_t cap, uint32_t prog, uint32_t vers, int proc, int type,
		     uint32_t serial, const char *name)
{
	struct lv_header h = { prog, vers, proc, type, serial, LV_STATUS_OK };

	return vmig__lv_pack(buf, cap, &h, name ? xdr_name_arg : NULL, (void *)name);
}

static void send_all(int fd, const void *buf, size_t len)
{
	ck_assert_int_eq(send(fd, buf, len, MSG_NOSIGNAL), (ssize_t)len);
}

/* Read one packet; its header in @h, its error (if status is ERROR) in @code.
 * false if the connection closed (or nothing came in 5 s). */
static bool recv_packet(int fd, struct lv_header *h, int *code, char *msg, size_t msglen)
{
	struct timeval tv = { 5, 0 };
	uint32_t be, len;
	char buf[65536];
	XDR x;

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
again:
	if (recv(fd, &be, 4, MSG_WAITALL) != 4)
		return false;
	len = ntohl(be);
	ck_assert_msg(len >= 28 && len - 4 <= sizeof(buf), "reply of %u bytes", len);
	ck_assert_int_eq(recv(fd, buf, len - 4, MSG_WAITALL), (ssize_t)(len - 4));
	xdrmem_create(&x, buf, len - 4, XDR_DECODE);
	ck_assert(vmig__lv_xdr_header(&x, h));
	if (h->prog == LV_KEEPALIVE_PROGRAM && h->proc == LV_KEEPALIVE_PING) {
		/* The endpoint pings while a call takes long: not a reply. */
		xdr_destroy(&x);
		goto again;
	}
	*code = 0;
	if (msg)
		msg[0] = 0;
	if (h->status == LV_STATUS_ERROR) {
		int domain;
		char *m = NULL;

		ck_assert(xdr_int(&x, code) && xdr_int(&x, &domain) &&
			  vmig__lv_xdr_opt_string(&x, &m));
		if (msg && m)
			snprintf(msg, msglen, "%s", m);
		free(m);
	}
	xdr_destroy(&x);
	return true;
}

/* The endpoint still serves: virsh lists. */
static void assert_endpoint_serves(void)
{
	struct kvm_test_result r;

	ck_assert_msg(kill(serve_a, 0) == 0, "libvirt-serve died");
	VIRSH_A(&r, "list");
	ck_assert_msg(r.status == 0 && strstr(r.out, "Name"), "virsh list after: %d %s %s",
		      r.status, r.out, r.err);
}

START_TEST(malformed_packets)
{
	struct lv_header h;
	char buf[512], msg[1024];
	size_t len;
	int fd, code;
	uint32_t be;

	/* A length shorter than a header: the connection is closed. */
	fd = connect_to(sock_a);
	ck_assert_int_ge(fd, 0);
	be = htonl(8);
	send_all(fd, &be, 4);
	send_all(fd, "abcd", 4);
	ck_assert_msg(!recv_packet(fd, &h, &code, NULL, 0), "a reply to a bad length");
	close(fd);

	/* A length past the limit (4 GiB - 1): closed, nothing allocated. */
	fd = connect_to(sock_a);
	be = htonl(0xffffffffu);
	send_all(fd, &be, 4);
	ck_assert(!recv_packet(fd, &h, &code, NULL, 0));
	close(fd);

	/* On one connection: each bad packet gets an error reply, and the
	 * connection goes on serving. */
	fd = connect_to(sock_a);
	len = packet(buf, sizeof(buf), 0x12345678, 1, 1, LV_TYPE_CALL, 7, NULL);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.status == LV_STATUS_ERROR && h.serial == 7 && code == VIR_ERR_RPC &&
		      strstr(msg, "unknown program"), "unknown program: status %d serial %u "
		      "code %d '%s'", h.status, h.serial, code, msg);

	len = packet(buf, sizeof(buf), LV_PROGRAM, 9, 1, LV_TYPE_CALL, 8, NULL);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.status == LV_STATUS_ERROR && h.serial == 8 && strstr(msg, "version"),
		      "bad version: %d '%s'", h.status, msg);

	/* lookup-by-name whose string says 100 bytes and brings 3. */
	len = packet(buf, sizeof(buf), LV_PROGRAM, 1, 23, LV_TYPE_CALL, 9, NULL);
	be = htonl(100);
	memcpy(buf + len, &be, 4);
	memcpy(buf + len + 4, "abc", 3);
	len += 8;
	be = htonl((uint32_t)len);
	memcpy(buf, &be, 4);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.status == LV_STATUS_ERROR && h.serial == 9 && code == VIR_ERR_RPC &&
		      strstr(msg, "cannot decode"), "truncated XDR: %d %d '%s'", h.status, code, msg);

	/* A call with no body at all where one is needed. */
	len = packet(buf, sizeof(buf), LV_PROGRAM, 1, 16, LV_TYPE_CALL, 10, NULL);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.status == LV_STATUS_ERROR && code == VIR_ERR_RPC, "empty body: %d '%s'",
		      code, msg);

	/* A procedure we do not serve: libvirt's "not supported". */
	len = packet(buf, sizeof(buf), LV_PROGRAM, 1, 99999, LV_TYPE_CALL, 11, NULL);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.status == LV_STATUS_ERROR && code == VIR_ERR_NO_SUPPORT,
		      "unknown procedure: %d '%s'", code, msg);

	/* Keepalive: PING gets PONG. */
	len = packet(buf, sizeof(buf), LV_KEEPALIVE_PROGRAM, 1, LV_KEEPALIVE_PING,
		     LV_TYPE_MESSAGE, 0, NULL);
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, NULL, 0));
	ck_assert_msg(h.prog == LV_KEEPALIVE_PROGRAM && h.proc == LV_KEEPALIVE_PONG &&
		      h.type == LV_TYPE_MESSAGE, "no PONG: prog 0x%x proc %d", h.prog, h.proc);

	/* And a good call still works on this connection. */
	len = packet(buf, sizeof(buf), LV_PROGRAM, 1, 23, LV_TYPE_CALL, 12, "no-such-vm");
	send_all(fd, buf, len);
	ck_assert(recv_packet(fd, &h, &code, msg, sizeof(msg)));
	ck_assert_msg(h.serial == 12 && code == VIR_ERR_NO_DOMAIN, "lookup: %d '%s'", code, msg);

	/* A header cut short inside a packet of the right length. */
	be = htonl(4 + 8);
	memcpy(buf, &be, 4);
	memset(buf + 4, 0, 8);
	send_all(fd, buf, 12);
	ck_assert(!recv_packet(fd, &h, &code, NULL, 0));
	close(fd);

	/* A packet that ends in the middle: the client goes away. */
	fd = connect_to(sock_a);
	len = packet(buf, sizeof(buf), LV_PROGRAM, 1, 23, LV_TYPE_CALL, 1, "lv-half");
	send_all(fd, buf, len / 2);
	close(fd);

	assert_endpoint_serves();
}
END_TEST

/*
 * Random bodies for every procedure served (and a few not): each call
 * gets exactly one reply with its serial, or the endpoint closes the
 * connection (connect-close); the endpoint never dies.  Seeded: the same
 * packets every run.
 */
START_TEST(random_calls_survive)
{
	static const int procs[] = { 1, 2, 3, 4, 5, 6, 7, 10, 12, 14, 15, 16, 17, 18, 19, 21,
				     22, 23, 24, 25, 28, 33, 34, 37, 51, 59, 60, 66, 110, 149,
				     150, 151, 157, 163, 164, 166, 183, 200, 202, 207, 212, 229,
				     234, 242, 258, 273, 298, 305, 8, 300, 444 };
	unsigned int seed = 1, i, replies = 0, closed = 0;
	char buf[1024];
	int fd = connect_to(sock_a);

	ck_assert_int_ge(fd, 0);
	for (i = 0; i < 600; i++) {
		int proc = procs[rand_r(&seed) % (sizeof(procs) / sizeof(procs[0]))], code;
		size_t len = packet(buf, sizeof(buf), LV_PROGRAM, 1, proc, LV_TYPE_CALL, i, NULL);
		size_t body = (size_t)(rand_r(&seed) % 256), k;
		struct lv_header h;
		uint32_t be;

		for (k = 0; k < body; k++) {
			/* Mostly small numbers, so that lengths and counts are
			 * sometimes right and decoding goes deeper. */
			int r = rand_r(&seed);

			buf[len + k] = (char)(r % 4 == 0 ? r >> 8 : (r % 4 == 1 ? 0 : r % 8));
		}
		len += body;
		be = htonl((uint32_t)len);
		memcpy(buf, &be, 4);
		send_all(fd, buf, len);
		ck_assert_msg(recv_packet(fd, &h, &code, NULL, 0), "no reply to call %u (proc %d)",
			      i, proc);
		ck_assert_msg(h.serial == i && h.type == LV_TYPE_REPLY, "call %u (proc %d): reply "
			      "serial %u type %d", i, proc, h.serial, h.type);
		replies++;
		if (proc == 2 && h.status == LV_STATUS_OK) {
			/* connect-close: the endpoint ends the connection. */
			ck_assert(!recv_packet(fd, &h, &code, NULL, 0));
			close(fd);
			fd = connect_to(sock_a);
			ck_assert_msg(fd >= 0, "the endpoint is gone after call %u", i);
			closed++;
		}
	}
	ck_assert_uint_gt(closed, 0);
	close(fd);
	ck_assert_uint_eq(replies, 600);
	assert_endpoint_serves();
}
END_TEST

/* ------------------------------------------------------------------------
 * Migrations
 */

/* virsh migrate --live --p2p ... to B over ssh: the VM arrives and runs. */
START_TEST(virsh_migrate_p2p)
{
	struct kvm_test_result r;
	char log[65536];
	const char *l;

	start_vm("lv3", "96M", "rate=1000,wss=4M");
	/* -k 1 -K 2: virsh's keepalive would drop a silent endpoint within
	 * ~3 s, and the migration takes longer than that here. */
	VIRSH_A(&r, "-k", "1", "-K", "2", "migrate", "--live", "--p2p", "--persistent",
		"--undefinesource", "--compressed", "--bandwidth", "500", "lv3", dest_uri);
	serve_log("a", log, sizeof(log));
	ck_assert_msg(r.status == 0, "virsh migrate: %d %s %s (endpoint: %s)", r.status, r.out,
		      r.err, log);
	ck_assert_msg(strstr(log, "\"bandwidth_bps\":524288000"), "bandwidth not passed: %s",
		      log);
	ck_assert_msg(strstr(log, "\"uri\":\"ssh://"), "not over ssh: %s", log);

	/* Gone from A, running on B, as both virsh and vmig see it. */
	ck_assert(!kvm_test_exists_in(run_a, "lv3", "sock"));
	VIRSH_A(&r, "list", "--all");
	ck_assert_msg(r.status == 0 && !line_of(r.out, "lv3"), "A still lists lv3: %s", r.out);
	VIRSH_B(&r, "list");
	l = line_of(r.out, "lv3");
	ck_assert_msg(r.status == 0 && l && strstr(l, "running"), "B lists: %s %s", r.out, r.err);
	kvm_test_assert_guest_runs(run_b, "lv3");
	VIRSH_B(&r, "destroy", "lv3");
	ck_assert_msg(r.status == 0, "destroy on B: %s", r.err);
}
END_TEST

/* domjobinfo during a migration that cannot converge, then domjobabort:
 * the migration ends, cancelled, and the VM keeps running on A. */
START_TEST(virsh_jobinfo_and_abort)
{
	const char *argv[] = { VIRSH, "-c", uri_a, "migrate", "--live", "--p2p", "lv2",
			       dest_uri, NULL };
	struct kvm_test_proc migp = { 0 };
	struct kvm_test_result r, mig;
	uint64_t end;
	bool seen = false;

	start_vm("lv2", "160M", "rate=max,wss=48M");
	/* 1 ms of downtime: with 2 x 48 MiB dirtied at full speed, never reached. */
	VIRSH_A(&r, "migrate-setmaxdowntime", "lv2", "1");
	ck_assert_msg(r.status == 0, "migrate-setmaxdowntime: %s", r.err);
	kvm_test_spawn(&migp, argv);
	end = kvm_test_now_ms() + 30000;
	while (!seen && kvm_test_now_ms() < end) {
		const char *p, *q;

		kvm_test_sleep_ms(200);
		VIRSH_A(&r, "domjobinfo", "lv2");
		ck_assert_msg(r.status == 0, "domjobinfo: %s", r.err);
		p = strstr(r.out, "Iteration:");
		q = strstr(r.out, "Data processed:");
		seen = strstr(r.out, "Unbounded") && strstr(r.out, "Outgoing migration") &&
		       q && atof(q + 15) > 0 && p && atoi(p + 10) >= 2;
	}
	ck_assert_msg(seen, "domjobinfo never showed the migration's iterations: %s", r.out);
	ck_assert_msg(strstr(r.out, "Memory bandwidth") && strstr(r.out, "Dirty rate"),
		      "domjobinfo: %s", r.out);

	/* migrate-setspeed reaches the running migration's cap at once. */
	VIRSH_A(&r, "migrate-setspeed", "lv2", "64");
	ck_assert_msg(r.status == 0, "migrate-setspeed: %s", r.err);
	{
		struct json_object *st = kvm_test_vm_status(run_a, "lv2"), *mg = NULL;

		ck_assert(json_object_object_get_ex(st, "migration", &mg));
		ck_assert_msg(json_object_get_int64(json_object_object_get(mg,
			      "bandwidth_limit_bps")) == 64 << 20, "%s",
			      json_object_to_json_string(mg));
		json_object_put(st);
	}

	VIRSH_A(&r, "domjobabort", "lv2");
	ck_assert_msg(r.status == 0, "domjobabort: %s", r.err);
	kvm_test_finish(&migp, &mig);
	ck_assert_msg(mig.status == 1 && strstr(mig.err, "operation aborted"),
		      "migrate after abort: %d %s %s", mig.status, mig.out, mig.err);
	kvm_test_assert_guest_runs(run_a, "lv2");
	ck_assert(!kvm_test_exists_in(run_b, "lv2", "sock"));
	VIRSH_A(&r, "domjobinfo", "--completed", "lv2");
	ck_assert_msg(r.status == 0 && strstr(r.out, "Cancelled"), "completed job: %s %s",
		      r.out, r.err);
	VIRSH_A(&r, "destroy", "lv2");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/* The libvirt API: virDomainMigrateToURI3 with typed parameters while a
 * second thread polls virDomainGetJobStats on the same connection. */
START_TEST(api_migrate_with_job_stats)
{
	struct kvm_test_result r;
	char log[65536];
	const char *p;

	/* 2 x 24 MiB of random data, written once: lz4 cannot shrink it, so
	 * the transfer itself lasts a while and the polls see it. */
	start_vm("lv4", "128M", "rate=max,wss=24M,fill=random,idle_after=1");
	run_list(&r, NULL, lv_client, uri_a, "lv4",
		 (const char *const[]){ dest_uri, "lv4b", "300", "1", NULL });
	serve_log("a", log, sizeof(log));
	ck_assert_msg(r.status == 0, "lv-client: %d %s %s (endpoint: %s)", r.status, r.out,
		      r.err, log);
	ck_assert_msg(strstr(r.out, "migrate=ok"), "lv-client: %s", r.out);
	p = strstr(r.out, "unbounded=");
	ck_assert_msg(p && atoi(p + 10) >= 1, "no job stats during the migration: %s", r.out);
	p = strstr(r.out, "complete=");
	ck_assert_msg(p && atoi(p + 9) >= 1, "job stats without a migration's fields: %s", r.out);
	/* vmig publishes its counters a few times a second and at the end of
	 * each long pass; how much the polls catch before the switchover
	 * depends on the machine's load, so only: some, and no more than all. */
	p = strstr(r.out, "total=");
	ck_assert_msg(p && strtoull(p + 6, NULL, 10) == 128ull << 20, "memory_total: %s", r.out);
	p = strstr(r.out, "max_processed=");
	ck_assert_msg(p && strtoull(p + 14, NULL, 10) > 0 &&
		      strtoull(p + 14, NULL, 10) <= 2 * (128ull << 20), "data_processed: %s", r.out);
	p = strstr(r.out, "jobinfo=");
	ck_assert_msg(p && atoi(p + 8) >= 1, "virDomainGetJobInfo saw no job: %s", r.out);

	/* The typed parameters arrived unchanged and became vmig's options. */
	ck_assert_msg(strstr(log, "\"dest_name\":\"lv4b\""), "dname: %s", log);
	ck_assert_msg(strstr(log, "\"bandwidth_bps\":314572800"), "bandwidth: %s", log);
	ck_assert_msg(strstr(log, "\"channels\":1"), "parallel connections: %s", log);
	ck_assert_msg(strstr(log, "\"compress\":\"lz4\""), "compression: %s", log);

	ck_assert(!kvm_test_exists_in(run_a, "lv4", "sock"));
	{
		struct json_object *o = kvm_test_vm_status(run_b, "lv4b");

		ck_assert_str_eq(kvm_test_vm_state(o), "running");   /* idle by now: no progress */
		json_object_put(o);
	}
	VMIG_B(&r, "stop", "lv4b");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/* --migrateuri tcp://: the stream goes straight to a 'vmig incoming
 * --listen' on B, no SSH. */
START_TEST(virsh_migrate_tcp_migrateuri)
{
	char listen[64];
	struct kvm_test_result r;
	int port = kvm_test_free_port();

	snprintf(listen, sizeof(listen), "tcp://127.0.0.1:%d", port);
	VMIG_B(&r, "incoming", "--listen", listen, "--detach");
	ck_assert_msg(r.status == 0, "incoming: %s", r.err);
	start_vm("lv9", "64M", "rate=1000,wss=2M");
	VIRSH_A(&r, "migrate", "--live", "--p2p", "--migrateuri", listen, "lv9", dest_uri);
	ck_assert_msg(r.status == 0, "virsh migrate --migrateuri: %s %s", r.out, r.err);
	ck_assert(!kvm_test_exists_in(run_a, "lv9", "sock"));
	kvm_test_assert_guest_runs(run_b, "lv9");
	VMIG_B(&r, "stop", "lv9");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/*
 * libvirt's own SSH transport to an endpoint: virsh logs in with OpenSSH
 * and reaches the socket through nc (proxy=netcat).  OpenSSH reads
 * known_hosts from the passwd entry's home, not $HOME: the command=
 * parameter names a wrapper that points it at the test's file.
 */
START_TEST(virsh_over_libvirt_ssh_transport)
{
	char wrap[400], text[800], uri[1200];
	struct passwd *pw = getpwuid(geteuid());
	struct kvm_test_result r;
	const char *l;

	ck_assert_msg(access("/usr/bin/nc", X_OK) == 0, "no /usr/bin/nc: install Debian's "
		      "netcat-openbsd (tools/install-deps)");
	snprintf(wrap, sizeof(wrap), "%s/ssh-wrap", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nexec ssh -o UserKnownHostsFile=%s "
		 "-o BatchMode=yes \"$@\"\n", known_hosts);
	kvm_test_write_file(wrap, text, 0755);
	snprintf(uri, sizeof(uri), "vmig+ssh://%s@127.0.0.1:%d/system?socket=%s&keyfile=%s&"
		 "command=%s&proxy=netcat", pw->pw_name, sshd.port, sock_a, user_key, wrap);
	start_vm("lv10", "48M", "rate=500,wss=1M");
	run_list(&r, NULL, VIRSH, "-c", uri, (const char *const[]){ "list", NULL });
	l = line_of(r.out, "lv10");
	ck_assert_msg(r.status == 0 && l && strstr(l, "running"), "virsh over ssh: %d %s %s",
		      r.status, r.out, r.err);
	run_list(&r, NULL, VIRSH, "-c", uri, (const char *const[]){ "suspend", "lv10", NULL });
	ck_assert_msg(r.status == 0, "suspend over ssh: %s", r.err);
	run_list(&r, NULL, VIRSH, "-c", uri, (const char *const[]){ "domstate", "lv10", NULL });
	ck_assert_msg(r.status == 0 && strstr(r.out, "paused"), "domstate: %s %s", r.out, r.err);
	run_list(&r, NULL, VIRSH, "-c", uri, (const char *const[]){ "destroy", "lv10", NULL });
	ck_assert_msg(r.status == 0, "destroy over ssh: %s", r.err);
	ck_assert(!kvm_test_exists_in(run_a, "lv10", "sock"));
}
END_TEST

/* Flags and parameters vmig cannot honour are refused, the VM stays. */
START_TEST(unsupported_migration_refused)
{
	struct kvm_test_result r;

	start_vm("lv5", "64M", "rate=2000,wss=2M");
	VIRSH_A(&r, "migrate", "--live", "--p2p", "--tunnelled", "lv5", dest_uri);
	ck_assert_msg(r.status != 0 && strstr(r.err, "tunnelled"), "tunnelled: %s", r.err);
	VIRSH_A(&r, "migrate", "--live", "lv5", dest_uri);
	ck_assert_msg(r.status != 0, "non-p2p migration: %s %s", r.out, r.err);
	VIRSH_A(&r, "migrate", "--live", "--p2p", "lv5", "qemu+ssh://127.0.0.1/system");
	ck_assert_msg(r.status != 0 && strstr(r.err, "vmig+ssh"), "qemu URI: %s", r.err);
	kvm_test_assert_guest_runs(run_a, "lv5");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("libvirt");
	TCase *local = tcase_create("local"), *mig = tcase_create("migration");
	TCase *defs = tcase_create("definitions");
	const char *v;

	kvm_test_require_kvm();
	if (access(VIRSH, X_OK) < 0) {
		printf("SKIP: no %s (tools/install-deps installs Debian's libvirt-clients)\n", VIRSH);
		return SKIP_EXIT;
	}
	if (access(SSHD, X_OK) < 0) {
		printf("SKIP: no %s (tools/install-deps installs Debian's openssh-server)\n", SSHD);
		return SKIP_EXIT;
	}
	v = getenv("VMIG");
	if (!v || !*v) {
		printf("set VMIG to the vmig binary\n");
		return EXIT_FAILURE;
	}
	/* lv-client is built beside this test. */
	{
		char self[4000];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
		char *slash;

		self[n > 0 ? n : 0] = 0;
		slash = strrchr(self, '/');
		if (slash)
			*slash = 0;
		snprintf(lv_client, sizeof(lv_client), "%s/lv-client", self);
	}

	tcase_add_unchecked_fixture(local, runner_setup, runner_teardown);
	tcase_add_checked_fixture(local, setup_local, teardown);
	tcase_set_timeout(local, 60);
	tcase_add_test(local, virsh_list_info_control);
	tcase_add_test(local, malformed_packets);
	tcase_add_test(local, virsh_create_from_xml);
	tcase_add_test(local, random_calls_survive);
	suite_add_tcase(s, local);

	tcase_add_unchecked_fixture(defs, runner_setup, runner_teardown);
	tcase_add_checked_fixture(defs, setup_local, teardown);
	tcase_set_timeout(defs, 90);
	tcase_add_test(defs, virsh_define_start_undefine);
	suite_add_tcase(s, defs);

	tcase_add_unchecked_fixture(mig, runner_setup, runner_teardown);
	tcase_add_checked_fixture(mig, setup_migration, teardown);
	tcase_set_timeout(mig, 120);
	tcase_add_test(mig, virsh_migrate_p2p);
	tcase_add_test(mig, virsh_jobinfo_and_abort);
	tcase_add_test(mig, api_migrate_with_job_stats);
	tcase_add_test(mig, virsh_migrate_tcp_migrateuri);
	tcase_add_test(mig, virsh_over_libvirt_ssh_transport);
	tcase_add_test(mig, unsupported_migration_refused);
	suite_add_tcase(s, mig);
	return kvm_test_run(s);
}
