/*
 * CRC-32C.  The hardware path feeds 8 bytes at a time to the SSE4.2 crc32
 * instruction; the software path is slicing-by-8 over tables built once
 * (pthread_once), for CPUs without SSE4.2.  Both compute the same function,
 * and the unit tests check them against each other and known vectors.
 *
 * One crc32 instruction has a latency of 3 cycles but a throughput of 1,
 * so a single dependent chain runs at a third of the possible speed.  With
 * PCLMULQDQ as well, long buffers go in rounds of three independent lanes
 * of LANE bytes whose CRCs are then merged: the CRC register is linear, so
 * reg(A|B|C) = reg(A)*x^(8*2*LANE) ^ reg(B)*x^(8*LANE) ^ reg(C) (mod P,
 * B and C started from 0).  The multiplication is a carry-less multiply by
 * x^(8n-33) mod P followed by crc32 of the 64-bit product, which reduces
 * it and supplies the remaining x^32 (the other 1 is the bit offset of a
 * reflected carry-less product).
 */
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include <nmmintrin.h>
#include <wmmintrin.h>

#include "vmig/crc32c.h"

#define POLY_REFLECTED 0x82F63B78u

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void table_build(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (POLY_REFLECTED & (0u - (c & 1)));
		table[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++)
			table[t][i] = (table[t - 1][i] >> 8) ^
				      table[0][table[t - 1][i] & 0xff];
}

static uint32_t crc_sw(uint32_t c, const unsigned char *p, size_t len)
{
	pthread_once(&table_once, table_build);

	while (len && ((uintptr_t)p & 7)) {
		c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
		len--;
	}
	while (len >= 8) {
		uint64_t w;

		memcpy(&w, p, 8);   /* x86 is little-endian */
		w ^= c;
		c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^
		    table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff] ^
		    table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
		    table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
	return c;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t c, const unsigned char *p, size_t len)
{
	uint64_t c64;

	while (len && ((uintptr_t)p & 7)) {
		c = _mm_crc32_u8(c, *p++);
		len--;
	}
	c64 = c;
	while (len >= 32) {
		uint64_t w[4];

		memcpy(w, p, 32);
		c64 = _mm_crc32_u64(c64, w[0]);
		c64 = _mm_crc32_u64(c64, w[1]);
		c64 = _mm_crc32_u64(c64, w[2]);
		c64 = _mm_crc32_u64(c64, w[3]);
		p += 32;
		len -= 32;
	}
	while (len >= 8) {
		uint64_t w;

		memcpy(&w, p, 8);
		c64 = _mm_crc32_u64(c64, w);
		p += 8;
		len -= 8;
	}
	c = (uint32_t)c64;
	while (len--)
		c = _mm_crc32_u8(c, *p++);
	return c;
}

/*
 * Three independent crc32 chains over three lanes of a block (the
 * instruction's latency is three times its throughput), joined by
 * shifting the first two with carry-less multiplies: @k_lane and
 * @k_2lane are x^(8*lane-33) and x^(16*lane-33) mod P, bit-reflected.
 */
#define LANE 512
#define K_LANE  0xdd7e3b0cu
#define K_2LANE 0x170076fau
/* A 4 KiB page, the stream's unit, is three lanes of 1360 and 16 bytes. */
#define PAGE_LANE    1360
#define K_PAGE_LANE  0x3f70cc6fu
#define K_PAGE_2LANE 0x5aa1f3cfu

__attribute__((target("sse4.2,pclmul")))
static uint32_t shift_lanes(uint64_t reg, uint32_t k)
{
	__m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)(uint32_t)reg),
					    _mm_cvtsi32_si128((int)k), 0);

	return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

__attribute__((target("sse4.2,pclmul"), always_inline))
static inline uint32_t crc_lanes(uint32_t c, const unsigned char **pp, size_t *lenp,
				 size_t lane, uint32_t k_lane, uint32_t k_2lane)
{
	const unsigned char *p = *pp;
	size_t len = *lenp;

	while (len >= 3 * lane) {
		uint64_t c0 = c, c1 = 0, c2 = 0;

		for (size_t i = 0; i < lane; i += 8) {
			uint64_t a, b, d;

			memcpy(&a, p + i, 8);
			memcpy(&b, p + lane + i, 8);
			memcpy(&d, p + 2 * lane + i, 8);
			c0 = _mm_crc32_u64(c0, a);
			c1 = _mm_crc32_u64(c1, b);
			c2 = _mm_crc32_u64(c2, d);
		}
		c = shift_lanes(c0, k_2lane) ^ shift_lanes(c1, k_lane) ^ (uint32_t)c2;
		p += 3 * lane;
		len -= 3 * lane;
	}
	*pp = p;
	*lenp = len;
	return c;
}

__attribute__((target("sse4.2,pclmul")))
static uint32_t crc_hw3(uint32_t c, const unsigned char *p, size_t len)
{
	while (len && ((uintptr_t)p & 7)) {
		c = _mm_crc32_u8(c, *p++);
		len--;
	}
	if (len == 4096)
		c = crc_lanes(c, &p, &len, PAGE_LANE, K_PAGE_LANE, K_PAGE_2LANE);
	else
		c = crc_lanes(c, &p, &len, LANE, K_LANE, K_2LANE);
	return crc_hw(c, p, len);
}

uint32_t vmig__crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
	return ~crc_sw(~crc, buf, len);
}

uint32_t vmig_crc32c(uint32_t crc, const void *buf, size_t len)
{
	if (__builtin_cpu_supports("sse4.2")) {
		if (len >= 3 * LANE && __builtin_cpu_supports("pclmul"))
			return ~crc_hw3(~crc, buf, len);
		return ~crc_hw(~crc, buf, len);
	}
	return ~crc_sw(~crc, buf, len);
}
