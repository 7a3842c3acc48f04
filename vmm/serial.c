/*
 * 16550 UART at COM1 (0x3f8), transmit side.
 *
 * Enough of the register file for a guest driver to probe and configure
 * it: divisor latch, LCR/MCR/IER/scratch read back, LSR always "transmitter
 * empty", no receive data and no interrupts (a console for output).
 * Characters go straight to the console fd; a vCPU thread blocks on it
 * only as long as the write takes.
 */
#include "config.h"

#include <errno.h>
#include <unistd.h>

#include "vmm-internal.h"

enum {
	UART_RBR_THR = 0, UART_IER = 1, UART_IIR_FCR = 2, UART_LCR = 3,
	UART_MCR = 4, UART_LSR = 5, UART_MSR = 6, UART_SCR = 7,
};

#define LCR_DLAB      0x80
#define LSR_THRE      0x20
#define LSR_TEMT      0x40
#define IIR_NO_INT    0x01
#define MCR_LOOP      0x10
#define MSR_DCD_DSR_CTS 0xb0

void vmig__serial_init(struct vmig__serial *s, int out_fd)
{
	pthread_mutex_init(&s->lock, NULL);
	s->out_fd = out_fd;
	s->ier = s->mcr = s->scr = s->dlm = s->fcr = 0;
	s->lcr = 0x03;
	s->dll = 0x01;        /* 115200 baud */
}

void vmig__serial_fini(struct vmig__serial *s)
{
	pthread_mutex_destroy(&s->lock);
}

static void emit(struct vmig__serial *s, uint8_t c)
{
	ssize_t n;

	if (s->out_fd < 0 || (s->mcr & MCR_LOOP))
		return;
	do {
		n = write(s->out_fd, &c, 1);
	} while (n < 0 && errno == EINTR);
	/* A closed or full console loses output, never the guest. */
}

void vmig__serial_io(struct vmig__serial *s, unsigned int off, bool is_write,
		     uint8_t *data)
{
	bool dlab;

	pthread_mutex_lock(&s->lock);
	dlab = s->lcr & LCR_DLAB;
	if (is_write) {
		switch (off) {
		case UART_RBR_THR:
			if (dlab)
				s->dll = *data;
			else
				emit(s, *data);
			break;
		case UART_IER:
			if (dlab)
				s->dlm = *data;
			else
				s->ier = *data & 0x0f;
			break;
		case UART_IIR_FCR:
			s->fcr = *data;
			break;
		case UART_LCR:
			s->lcr = *data;
			break;
		case UART_MCR:
			s->mcr = *data & 0x1f;
			break;
		case UART_SCR:
			s->scr = *data;
			break;
		default:
			break;      /* LSR and MSR are read-only */
		}
	} else {
		switch (off) {
		case UART_RBR_THR:
			*data = dlab ? s->dll : 0;
			break;
		case UART_IER:
			*data = dlab ? s->dlm : s->ier;
			break;
		case UART_IIR_FCR:
			*data = IIR_NO_INT | ((s->fcr & 1) ? 0xc0 : 0);
			break;
		case UART_LCR:
			*data = s->lcr;
			break;
		case UART_MCR:
			*data = s->mcr;
			break;
		case UART_LSR:
			*data = LSR_THRE | LSR_TEMT;
			break;
		case UART_MSR:
			*data = (s->mcr & MCR_LOOP) ? 0 : MSR_DCD_DSR_CTS;
			break;
		case UART_SCR:
			*data = s->scr;
			break;
		default:
			*data = 0xff;
		}
	}
	pthread_mutex_unlock(&s->lock);
}

void vmig__serial_save(struct vmig__serial *s, struct vmig__serial_state *out)
{
	pthread_mutex_lock(&s->lock);
	*out = (struct vmig__serial_state){ s->ier, s->lcr, s->mcr, s->scr, s->dll,
					    s->dlm, s->fcr, 0 };
	pthread_mutex_unlock(&s->lock);
}

void vmig__serial_load(struct vmig__serial *s, const struct vmig__serial_state *in)
{
	pthread_mutex_lock(&s->lock);
	s->ier = in->ier & 0x0f;
	s->lcr = in->lcr;
	s->mcr = in->mcr & 0x1f;
	s->scr = in->scr;
	s->dll = in->dll;
	s->dlm = in->dlm;
	s->fcr = in->fcr;
	pthread_mutex_unlock(&s->lock);
}
