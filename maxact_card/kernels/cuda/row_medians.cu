__device__ __forceinline__ unsigned maxact_pick(const unsigned* h, unsigned* rank) {
    unsigned b = 0, k = *rank;
    while (h[b] <= k) { k -= h[b]; ++b; }
    *rank = k;
    return b;
}

// for each top-K entry i that came from this batch (src[i] >= 0), the lower median of the |a| of row
// src[i] of x into median[i], as torch's median gives it: NaN where the row holds a NaN
extern "C" __global__ void __launch_bounds__(256) maxact_row_median_bf16(
        const unsigned short* __restrict__ x, long long row_stride, int width,
        const long long* __restrict__ src, float* __restrict__ median) {
    __shared__ unsigned h[256];
    __shared__ unsigned s_hi, s_rank;
    const long long r = src[blockIdx.x];
    if (r < 0) return;  // the same for the whole block
    const unsigned short* row = x + r * row_stride;
    h[threadIdx.x] = 0u;
    __syncthreads();
    int nan = 0;
    for (int c = threadIdx.x; c < width; c += 256) {
        const unsigned a = row[c] & 0x7FFFu;
        nan |= a > 0x7F80u;
        atomicAdd(&h[a >> 7], 1u);
    }
    if (__syncthreads_or(nan)) {
        if (threadIdx.x == 0) median[blockIdx.x] = __int_as_float(0x7FC00000);
        return;
    }
    if (threadIdx.x == 0) { s_rank = (unsigned)(width - 1) / 2; s_hi = maxact_pick(h, &s_rank); }
    __syncthreads();
    const unsigned hi = s_hi;
    if (threadIdx.x < 128) h[threadIdx.x] = 0u;
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += 256) {
        const unsigned a = row[c] & 0x7FFFu;
        if ((a >> 7) == hi) atomicAdd(&h[a & 0x7Fu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned rank = s_rank;
        median[blockIdx.x] = __uint_as_float(((hi << 7) | maxact_pick(h, &rank)) << 16);
    }
}
