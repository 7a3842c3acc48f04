/*
 * The run directory: where each VMM process puts its control socket
 * (NAME.sock) and, when detached, its console log (NAME.log).
 *
 * A VM's name becomes a file name, so it is restricted to a portable
 * character set that cannot climb out of the directory or look like an
 * option.  Functions only read the environment; thread-safe unless another
 * thread calls setenv() at the same time.
 */
#define _GNU_SOURCE 1

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmig/util.h"

#define VM_NAME_MAX 64

/* snprintf() into @buf, mapping truncation to -ENAMETOOLONG. */
static int path_result(int n, size_t len)
{
	if (n < 0)
		return -EINVAL;
	return (size_t)n < len ? 0 : -ENAMETOOLONG;
}

int vmig_rundir_get(char *buf, size_t len)
{
	const char *env = getenv("VMIG_RUN_DIR");

	if (env && *env) {
		if (*env != '/')
			return -EINVAL;
		return path_result(snprintf(buf, len, "%s", env), len);
	}
	if (geteuid() == 0)
		return path_result(snprintf(buf, len, "/run/vmig"), len);

	/* The XDG spec says to ignore a relative XDG_RUNTIME_DIR. */
	env = getenv("XDG_RUNTIME_DIR");
	if (env && *env == '/')
		return path_result(snprintf(buf, len, "%s/vmig", env), len);
	return -ENOENT;
}

/* mkdir(@path, 0700), accepting an existing directory. */
static int mkdir_one(const char *path)
{
	struct stat st;

	if (mkdir(path, 0700) == 0)
		return 0;
	if (errno != EEXIST)
		return -errno;
	if (stat(path, &st) < 0)
		return -errno;
	return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

int vmig_rundir_ensure(const char *dir)
{
	char path[PATH_MAX];
	size_t n;
	char *p;
	int err;

	if (!dir || !*dir)
		return -EINVAL;
	n = strlen(dir);
	if (n >= sizeof(path))
		return -ENAMETOOLONG;
	memcpy(path, dir, n + 1);
	while (n > 1 && path[n - 1] == '/')
		path[--n] = '\0';

	/* Parents first, looking before creating: an existing parent the
	 * user may not write to (/run/user, a read-only /) is fine. */
	for (p = path + 1; (p = strchr(p, '/')); p++) {
		struct stat st;

		*p = '\0';
		if (stat(path, &st) == 0) {
			err = S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
		} else if (errno == ENOENT) {
			err = mkdir_one(path);
		} else {
			err = -errno;
		}
		*p = '/';
		if (err)
			return err;
		while (p[1] == '/')
			p++;
	}
	return mkdir_one(path);
}

static bool name_char_ok(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

int vmig_vm_name_valid(const char *name)
{
	size_t i;

	if (!name || !*name || *name == '.' || *name == '-')
		return -EINVAL;
	for (i = 0; name[i]; i++)
		if (i >= VM_NAME_MAX || !name_char_ok(name[i]))
			return -EINVAL;
	return 0;
}

int vmig_rundir_path(const char *dir, const char *name, const char *suffix,
		     char *buf, size_t len)
{
	int n;

	if (suffix && *suffix)
		n = snprintf(buf, len, "%s/%s.%s", dir, name, suffix);
	else
		n = snprintf(buf, len, "%s/%s", dir, name);
	return path_result(n, len);
}

int vmig_rundir_wait_gone(const char *dir, const char *name, int timeout_ms)
{
	char path[PATH_MAX];
	int fd, waited = 0;

	if (vmig_rundir_path(dir, name, "pid", path, sizeof(path)) < 0)
		return -EINVAL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	while (flock(fd, LOCK_SH | LOCK_NB) < 0) {
		struct timespec ts = { 0, 20 * 1000000 };

		if (waited >= timeout_ms) {
			close(fd);
			return -ETIMEDOUT;
		}
		nanosleep(&ts, NULL);
		waited += 20;
	}
	close(fd);
	return 0;
}
