/*
 * libvirt's RPC wire format, as far as vmig speaks it: our own
 * definitions, encoded and decoded with libtirpc's XDR primitives.
 *
 * A packet is a 4-byte big-endian length that counts itself, a header of
 * six 4-byte fields (program, version, procedure, type, serial, status)
 * and an XDR body.  Strings are XDR strings; a string "that may be NULL"
 * is an XDR optional (a boolean, then the string); a domain is its name,
 * 16 bytes of UUID and a signed id; typed parameters are a name and a
 * union discriminated by libvirt's VIR_TYPED_PARAM_* numbers.
 *
 * Decoding allocates what it returns (strings with malloc(), as libtirpc
 * does); every length is bounded by the limits in libvirt-internal.h
 * before anything is allocated.  No state: thread-safe.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include "libvirt-internal.h"

bool vmig__lv_xdr_header(XDR *x, struct lv_header *h)
{
	return xdr_u_int(x, &h->prog) && xdr_u_int(x, &h->vers) && xdr_int(x, &h->proc) &&
	       xdr_int(x, &h->type) && xdr_u_int(x, &h->serial) && xdr_int(x, &h->status);
}

bool vmig__lv_xdr_string(XDR *x, char **s)
{
	if (x->x_op == XDR_ENCODE && !*s) {
		char *empty = (char *)"";

		return xdr_string(x, &empty, LV_STRING_MAX);
	}
	return xdr_string(x, s, LV_STRING_MAX);
}

bool vmig__lv_xdr_opt_string(XDR *x, char **s)
{
	bool_t present = *s != NULL;

	if (!xdr_bool(x, &present))
		return false;
	if (!present) {
		if (x->x_op == XDR_DECODE)
			*s = NULL;
		return true;
	}
	return xdr_string(x, s, LV_STRING_MAX);
}

bool vmig__lv_xdr_domain(XDR *x, struct lv_domain *d)
{
	return vmig__lv_xdr_string(x, &d->name) && xdr_opaque(x, (char *)d->uuid, 16) &&
	       xdr_int(x, &d->id);
}

void vmig__lv_domain_fini(struct lv_domain *d)
{
	if (!d)
		return;
	free(d->name);
	d->name = NULL;
}

static bool xdr_param(XDR *x, struct lv_param *p)
{
	if (!vmig__lv_xdr_string(x, &p->field) || !xdr_int(x, &p->type))
		return false;
	switch (p->type) {
	case VIR_TYPED_PARAM_INT:
		return xdr_int(x, &p->v.i);
	case VIR_TYPED_PARAM_UINT:
		return xdr_u_int(x, &p->v.ui);
	case VIR_TYPED_PARAM_LLONG:
		return xdr_int64_t(x, &p->v.l);
	case VIR_TYPED_PARAM_ULLONG:
		return xdr_uint64_t(x, &p->v.ul);
	case VIR_TYPED_PARAM_DOUBLE:
		return xdr_double(x, &p->v.d);
	case VIR_TYPED_PARAM_BOOLEAN:
		return xdr_int(x, &p->v.b);
	case VIR_TYPED_PARAM_STRING:
		return vmig__lv_xdr_string(x, &p->v.s);
	default:
		return false;         /* a type we cannot know the size of */
	}
}

void vmig__lv_params_free(struct lv_param *p, uint32_t n)
{
	uint32_t i;

	if (!p)
		return;
	for (i = 0; i < n; i++) {
		free(p[i].field);
		if (p[i].type == VIR_TYPED_PARAM_STRING)
			free(p[i].v.s);
	}
	free(p);
}

bool vmig__lv_xdr_params(XDR *x, struct lv_param **pp, uint32_t *n)
{
	uint32_t i;

	if (!xdr_u_int(x, n))
		return false;
	if (*n > LV_PARAMS_MAX)
		return false;
	if (x->x_op == XDR_DECODE) {
		*pp = calloc(*n ? *n : 1, sizeof(**pp));
		if (!*pp)
			return false;
	}
	for (i = 0; i < *n; i++) {
		if (!xdr_param(x, &(*pp)[i])) {
			if (x->x_op == XDR_DECODE) {
				/* Free what was decoded, including a half-decoded one. */
				if ((*pp)[i].type != VIR_TYPED_PARAM_STRING)
					(*pp)[i].v.s = NULL;
				vmig__lv_params_free(*pp, i + 1);
				*pp = NULL;
				*n = 0;
			}
			return false;
		}
	}
	return true;
}

bool vmig__lv_xdr_error(XDR *x, const struct lv_error *e)
{
	int code = e->code, domain = e->domain, level = VIR_ERR_ERROR, zero = 0;
	char *msg = (char *)e->msg, *none = NULL;
	bool_t absent = 0;

	return xdr_int(x, &code) && xdr_int(x, &domain) &&
	       vmig__lv_xdr_opt_string(x, &msg) && xdr_int(x, &level) &&
	       xdr_bool(x, &absent) &&                        /* dom */
	       vmig__lv_xdr_opt_string(x, &none) &&           /* str1 */
	       vmig__lv_xdr_opt_string(x, &none) &&           /* str2 */
	       vmig__lv_xdr_opt_string(x, &none) &&           /* str3 */
	       xdr_int(x, &zero) && xdr_int(x, &zero) &&      /* int1, int2 */
	       xdr_bool(x, &absent);                          /* net */
}

size_t vmig__lv_pack(char *buf, size_t cap, const struct lv_header *h,
		     bool (*body)(XDR *x, void *arg), void *arg)
{
	struct lv_header hh = *h;
	uint32_t len = 0;
	size_t total;
	XDR x;

	if (cap < LV_LEN_SIZE + LV_HEADER_SIZE)
		return 0;
	xdrmem_create(&x, buf, (u_int)cap, XDR_ENCODE);
	if (!xdr_u_int(&x, &len) || !vmig__lv_xdr_header(&x, &hh) || (body && !body(&x, arg))) {
		xdr_destroy(&x);
		return 0;
	}
	total = xdr_getpos(&x);
	len = (uint32_t)total;
	xdr_setpos(&x, 0);
	xdr_u_int(&x, &len);
	xdr_destroy(&x);
	return total;
}
