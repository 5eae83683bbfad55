__device__ __forceinline__ unsigned bf2_max_nan(unsigned a, unsigned b) {
    unsigned d; asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned bf2_min_nan(unsigned a, unsigned b) {
    unsigned d; asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned bf2_max(unsigned a, unsigned b) {
    unsigned d; asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
// how many of a word's two magnitudes lie below t16 (bf16 bits, the same in both halves), times 16
__device__ __forceinline__ int below16(unsigned a2, unsigned t2) {
#if __CUDA_ARCH__ >= 900
    unsigned m; asm("set.lt.u32.bf16x2 %0, %1, %2;" : "=r"(m) : "r"(a2), "r"(t2)); return __popc(m);
#else
    return (((a2 & 0xFFFFu) < (t2 & 0xFFFFu)) + ((a2 >> 16) < (t2 & 0xFFFFu))) << 4;
#endif
}
__device__ __forceinline__ float lo_of(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_of(unsigned w) { return __uint_as_float(w & 0xFFFF0000u); }
// two floats rounded to bf16 (to nearest, ties to even) in one word, lo in the low half
__device__ __forceinline__ unsigned bf2_round(float lo, float hi) {
    unsigned d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
// silu(g) * u for two bf16 pairs, rounded as eager torch rounds them: silu in float32 (as ATen's
// kernel writes it, x / (1 + exp(-x))) to bf16, then the product in float32 to bf16
__device__ __forceinline__ unsigned silu_mul2(unsigned g, unsigned u) {
    const float g0 = lo_of(g), g1 = hi_of(g);
    const unsigned s = bf2_round(g0 / (1.0f + expf(-g0)), g1 / (1.0f + expf(-g1)));
    return bf2_round(lo_of(s) * lo_of(u), hi_of(s) * hi_of(u));
}
__device__ __forceinline__ uint4 silu_mul8(uint4 g, uint4 u) {
    return make_uint4(silu_mul2(g.x, u.x), silu_mul2(g.y, u.y), silu_mul2(g.z, u.z), silu_mul2(g.w, u.w));
}
