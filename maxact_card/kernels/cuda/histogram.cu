#define SPARE NBINS

__device__ __forceinline__ void maxact_add(unsigned* h, unsigned key) {
    atomicAdd(&h[key], 1u);
}

// rows [blockIdx.x, n_rows) step gridDim.x; row r counts when mask[r]; x holds bf16 bits.
// vec: rows are 16-byte aligned with a width divisible by 8 (one uint4 load per 8 elements).
extern "C" __global__ void maxact_abs_hist_bf16(const unsigned short* __restrict__ x, int row_stride,
                                                 int n_rows, int width, const unsigned char* __restrict__ mask,
                                                 unsigned long long* __restrict__ counts, int vec) {
    __shared__ unsigned h[NBINS + 1];
    for (int i = threadIdx.x; i <= NBINS; i += blockDim.x) h[i] = 0u;
    __syncthreads();
    for (int row = blockIdx.x; row < n_rows; row += gridDim.x) {
        if (!mask[row]) continue;  // the same for every thread of the block
        const unsigned short* r = x + (long long)row * row_stride;
        if (vec) {
            const uint4* r4 = reinterpret_cast<const uint4*>(r);
            int n4 = width >> 3;
            int steps = (n4 + blockDim.x - 1) / blockDim.x;  // every lane of a warp iterates alike
            for (int s = 0; s < steps; ++s) {
                int c = s * blockDim.x + threadIdx.x;
                uint4 v = c < n4 ? __ldcs(r4 + c) : make_uint4(0, 0, 0, 0);
                unsigned w[4] = {v.x, v.y, v.z, v.w};
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    maxact_add(h, c < n4 ? maxact_key(w[j] & 0x7FFFu) : SPARE);
                    maxact_add(h, c < n4 ? maxact_key((w[j] >> 16) & 0x7FFFu) : SPARE);
                }
            }
        } else {
            int steps = (width + blockDim.x - 1) / blockDim.x;
            for (int s = 0; s < steps; ++s) {
                int c = s * blockDim.x + threadIdx.x;
                maxact_add(h, c < width ? maxact_key(r[c] & 0x7FFFu) : SPARE);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < NBINS; i += blockDim.x) {
        unsigned v = h[i];
        if (v) atomicAdd(counts + i, (unsigned long long)v);
    }
}
