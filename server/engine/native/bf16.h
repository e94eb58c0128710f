/* bfloat16 to and from float32, shared by the C kernels (c_kernels.py builds them). */
#ifndef LONGSERVE_BF16_H
#define LONGSERVE_BF16_H
#include <stdint.h>

static inline float bf16_to_float(uint16_t bits) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)bits << 16;
    return x.f;
}

/* Round to nearest even, as torch's bfloat16 does; a NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float value) {
    union { uint32_t u; float f; } x;
    x.f = value;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40u);
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}
#endif
