__device__ __forceinline__ unsigned maxact_key(unsigned a) {
    if (a >= 0x7F80u) return NONFINITE;
    int fine = (int)(a >> 1) - FINE_BIAS;
    return (unsigned)(fine < 0 ? 0 : (fine > OVERFLOW ? OVERFLOW : fine));
}
