/*
 * The file backend, for vmig save and vmig restore: the stream goes to or
 * comes from a regular file (or a device such as /dev/null).
 *
 * Writes go straight into the file, which is created mode 0600 because it
 * holds guest memory.  A full disk can surface on any write or only at
 * fsync (delayed allocation, network file systems), so shutdown_write
 * fsyncs and a save is complete only once that succeeded.  The messages
 * name the file and say what ENOSPC and EDQUOT mean.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "transport-internal.h"

struct file_transport {
	struct vmig_transport base;
	int fd;
	bool writing;
	bool synced;
};

static struct file_transport *to_file(struct vmig_transport *t)
{
	return (struct file_transport *)t;
}

static ssize_t file_readv(struct vmig_transport *t, const struct iovec *iov, int iovcnt)
{
	struct file_transport *f = to_file(t);

	for (;;) {
		ssize_t n = readv(f->fd, iov, iovcnt);
		int ret;

		if (n >= 0)
			return n;
		ret = -errno;
		if (ret == -EINTR)
			continue;
		vmig__transport_fail(t, ret, "read failed after %llu bytes: %s",
				     (unsigned long long)t->bytes_read, strerror(-ret));
		return ret;
	}
}

static ssize_t file_read(struct vmig_transport *t, void *buf, size_t len)
{
	struct iovec iov = { buf, len };

	return file_readv(t, &iov, 1);
}

static void write_error(struct vmig_transport *t, int ret, const char *what)
{
	unsigned long long done = (unsigned long long)t->bytes_written;

	switch (ret) {
	case -ENOSPC:
		vmig__transport_fail(t, ret,
				     "%s failed after %llu bytes: no space left on device (the file system is full; free space or save elsewhere)",
				     what, done);
		break;
	case -EDQUOT:
		vmig__transport_fail(t, ret,
				     "%s failed after %llu bytes: disk quota exceeded",
				     what, done);
		break;
	case -EFBIG:
		vmig__transport_fail(t, ret,
				     "%s failed after %llu bytes: the file is larger than this file system allows",
				     what, done);
		break;
	default:
		vmig__transport_fail(t, ret, "%s failed after %llu bytes: %s", what,
				     done, strerror(-ret));
		break;
	}
}

static ssize_t file_write(struct vmig_transport *t, const void *buf, size_t len)
{
	struct file_transport *f = to_file(t);

	if (!f->writing) {
		vmig__transport_fail(t, -EBADF, "opened for reading, not writing");
		return -EBADF;
	}
	for (;;) {
		ssize_t n = write(f->fd, buf, len);
		int ret;

		if (n >= 0) {
			f->synced = false;
			return n;
		}
		ret = -errno;
		if (ret == -EINTR)
			continue;
		write_error(t, ret, "write");
		return ret;
	}
}

static ssize_t file_writev(struct vmig_transport *t, const struct iovec *iov,
			   int iovcnt)
{
	struct file_transport *f = to_file(t);

	if (!f->writing)
		return file_write(t, NULL, 0);
	for (;;) {
		ssize_t n = writev(f->fd, iov, iovcnt);
		int ret;

		if (n >= 0) {
			f->synced = false;
			return n;
		}
		ret = -errno;
		if (ret == -EINTR)
			continue;
		write_error(t, ret, "write");
		return ret;
	}
}

static int file_shutdown_write(struct vmig_transport *t)
{
	struct file_transport *f = to_file(t);
	int ret;

	if (!f->writing || f->synced)
		return 0;
	if (fsync(f->fd) == 0) {
		f->synced = true;
		return 0;
	}
	ret = -errno;
	/* Devices and pipes cannot be synced; there is nothing to flush. */
	if (ret == -EINVAL || ret == -EROFS) {
		f->synced = true;
		return 0;
	}
	write_error(t, ret, "flushing to disk (fsync)");
	return ret;
}

static int file_fd(struct vmig_transport *t)
{
	return to_file(t)->fd;
}

static void file_close(struct vmig_transport *t)
{
	struct file_transport *f = to_file(t);

	if (f->fd >= 0)
		close(f->fd);
	free(f);
}

static const struct vmig_transport_ops file_ops = {
	.kind = "file",
	.read = file_read,
	.readv = file_readv,
	.write = file_write,
	.writev = file_writev,
	.shutdown_write = file_shutdown_write,
	.close = file_close,
	.fd = file_fd,
};

int vmig_transport_open_file(const char *path, bool write,
			     struct vmig_transport **out, struct vmig_err *err)
{
	struct file_transport *f;
	char desc[4200];
	struct stat st;
	int fd, ret;

	*out = NULL;
	if (!path || !*path) {
		vmig_err_set(err, -EINVAL, "empty file name");
		return -EINVAL;
	}
	snprintf(desc, sizeof(desc), "file:%s", path);
	if (write)
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	else
		fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot %s %s: %s%s",
			     write ? "create" : "open", path, strerror(-ret),
			     ret == -ENOENT && write ? " (does the directory exist?)" :
			     vmig__transport_hint(ret));
		return ret;
	}
	if (fstat(fd, &st) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot stat %s: %s", path, strerror(-ret));
		close(fd);
		return ret;
	}
	if (S_ISDIR(st.st_mode)) {
		vmig_err_set(err, -EISDIR, "%s is a directory", path);
		close(fd);
		return -EISDIR;
	}
	if (!write && S_ISREG(st.st_mode))
		posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);

	f = calloc(1, sizeof(*f));
	if (!f) {
		close(fd);
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	vmig_transport_init(&f->base, &file_ops, desc);
	f->fd = fd;
	f->writing = write;
	f->synced = true;
	*out = &f->base;
	return 0;
}
