// count a value into its histogram key, given its magnitude bits >> 1 as a byte offset (times 4): the
// key's clamp is one instruction on Hopper (VIADDMNMX.RELU). An inf or a NaN counts as overflow here;
// the rows that hold one move it to the non-finite key afterwards.
__device__ __forceinline__ void count(unsigned* h, unsigned off) {
    off = (unsigned)max(min((int)off - 4 * FINE_BIAS, 4 * OVERFLOW), 0);
    atomicAdd(reinterpret_cast<unsigned*>(reinterpret_cast<char*>(h) + off), 1u);
}
// how many of a word's two values are inf or NaN
__device__ __forceinline__ int nonfinite2(unsigned w) {
    return ((w & 0x7FFFu) >= 0x7F80u) + ((w & 0x7FFF0000u) >= 0x7F800000u);
}

#if FOLD
// one compare-exchange of a warp-wide bitonic network on (key, row) pairs, keys unique but for -1
__device__ __forceinline__ void exchange(long long& k, int& r, int j, bool take_max) {
    const long long pk = __shfl_xor_sync(FULL, k, j);
    const int pr = __shfl_xor_sync(FULL, r, j);
    if (take_max ? pk > k : pk < k) { k = pk; r = pr; }
}
// merge the 32 pairs of the lanes (one each) into the warp's list: its 16 largest keys, lane i holding
// the i-th (-1 where fewer): the pairs sorted largest first, their 16 largest reversed into lanes
// 16..31 beside the list (a bitonic sequence), then merged
__device__ __forceinline__ void merge_into(long long& lk, int& lr, long long k, int r, int lane) {
    #pragma unroll
    for (int kk = 2; kk <= 32; kk <<= 1) {
        #pragma unroll
        for (int j = kk >> 1; j > 0; j >>= 1) exchange(k, r, j, !(lane & j) == !(lane & kk));
    }
    const long long ck = __shfl_sync(FULL, k, 31 - lane);
    const int cr = __shfl_sync(FULL, r, 31 - lane);
    if (lane >= 16) { lk = ck; lr = cr; }
    #pragma unroll
    for (int j = 16; j > 0; j >>= 1) exchange(lk, lr, j, !(lane & j));
    if (lane >= 16) lk = -1;
}
// merge pairs [0, n) of (keys, rows) into the warp's list, 32 at a time by the warps in turn from
// `first`, skipping any 32 of which none beats the list's 16th key. GLOBAL: the pairs are in global
// memory, written by other blocks (read through L2); else in shared memory.
template <bool GLOBAL>
__device__ __forceinline__ void merge_all(long long& lk, int& lr, const long long* keys, const int* rows, int n,
                                          int first, int step, int lane) {
    for (int c0 = first; c0 < n; c0 += step) {
        const int i = c0 + lane;
        const long long k = i >= n ? -1LL : GLOBAL ? __ldcg(keys + i) : keys[i];
        const int r = i >= n ? 0 : GLOBAL ? __ldcg(rows + i) : rows[i];
        if (__any_sync(FULL, k > __shfl_sync(FULL, lk, 15))) merge_into(lk, lr, k, r, lane);
    }
}
#endif

// this thread's vectors of row r of src (zeros past the last row, and where `live_row` is false)
#define LOAD_VECS(dst, src, stride, r, live_row)                                             \
    do {                                                                                     \
        const bool live = (r) < n_rows && (live_row);                                        \
        const uint4* r4 = reinterpret_cast<const uint4*>(src + (long long)(r) * (stride));   \
        _Pragma("unroll")                                                                    \
        for (int j = 0; j < VEC; ++j) {                                                      \
            const int c = j * GROUP + t;                                                     \
            dst[j] = live && c < n4 ? __ldcs(r4 + c) : make_uint4(0u, 0u, 0u, 0u);          \
        }                                                                                    \
    } while (0)
// x's row r: the statistics never read padding, so it is not loaded, except by a gated scan,
// which writes the product of padding rows too
#define LOAD_ROW(dst, r) LOAD_VECS(dst, x, row_stride, r, GATED || mask[(r) < n_rows ? (r) : 0])

// A block takes ROWS rows at a time, one per group of GROUP threads: rows [blockIdx.x * ROWS + g,
// n_rows) step gridDim.x * ROWS for group g. Rows are 16-byte aligned, their width divisible by 8.
// Partials are per group: part index blockIdx.x * ROWS + g, of gridDim.x * ROWS.
extern "C" __global__ void __launch_bounds__(LAUNCH_BOUNDS) maxact_scan_bf16(
        const unsigned short* __restrict__ x, int row_stride, int n_rows, int width, int tokens_per_row,
        const unsigned char* __restrict__ mask, const long long* __restrict__ token,
        const long long* __restrict__ sample, unsigned* __restrict__ channel_max, unsigned* __restrict__ sample_max,
        unsigned long long* __restrict__ counts, float* __restrict__ row_f, int* __restrict__ row_i,
        long long* __restrict__ row_key, double* __restrict__ part_f, int* __restrict__ part_i,
        const unsigned short* __restrict__ up, int up_stride, unsigned short* __restrict__ out, int out_stride,
        unsigned* __restrict__ counters, long long* __restrict__ stage_key, int* __restrict__ stage_row,
        const long long* __restrict__ ids, float* __restrict__ acc_max, float* __restrict__ acc_min,
        long long* __restrict__ acc_count, double* __restrict__ acc_sum, double* __restrict__ acc_sumsq,
        long long* __restrict__ acc_nonfinite, long long* __restrict__ acc_massive, long long* __restrict__ topk_key,
        float* __restrict__ topk_value, long long* __restrict__ topk_channel, long long* __restrict__ topk_token,
        float* __restrict__ topk_median, long long* __restrict__ source, int top_k) {
    __shared__ __align__(16) unsigned h[TABLE];
    __shared__ float w_hi[THREADS / 32], w_lo[THREADS / 32], w_s[THREADS / 32], w_sq[THREADS / 32];
    __shared__ int w_bad[THREADS / 32], w_first[THREADS / 32], w_below[THREADS / 32];
    const float inf = __int_as_float(0x7F800000);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = tid / GROUP, t = tid % GROUP, w0 = g * GROUP_WARPS;
    const int n4 = width >> 3, n_parts = gridDim.x * ROWS, step = gridDim.x * ROWS;
    for (int i = tid; i < TABLE / 4; i += THREADS) reinterpret_cast<uint4*>(h)[i] = make_uint4(0u, 0u, 0u, 0u);
    unsigned cmax[VEC * 4];  // magnitudes, two bf16 per register
    #pragma unroll
    for (int j = 0; j < VEC * 4; ++j) cmax[j] = 0u;
    double p_sum = 0.0, p_sq = 0.0;
    float p_hi = -inf, p_lo = inf;
    int p_valid = 0, p_bad = 0, p_massive = 0;
    __syncthreads();
    // the next rows of the block are loaded while these are worked on
    uint4 v[VEC], next[VEC];
    LOAD_ROW(next, blockIdx.x * ROWS + g);
#if GATED
    uint4 uv[VEC], unext[VEC];  // up's rows, loaded ahead like x's
    LOAD_VECS(unext, up, up_stride, blockIdx.x * ROWS + g, true);
#endif
    for (int base = blockIdx.x * ROWS; base < n_rows; base += step) {
        const int row = base + g;
        const bool counted = row < n_rows && mask[row];
        #pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = next[j];
        LOAD_ROW(next, row + step);
#if GATED
        #pragma unroll
        for (int j = 0; j < VEC; ++j) uv[j] = unext[j];
        LOAD_VECS(unext, up, up_stride, row + step, true);
        if (row < n_rows) {
            uint4* o4 = reinterpret_cast<uint4*>(out + (long long)row * out_stride);
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int c = j * GROUP + t;
                if (c < n4) o4[c] = silu_mul8(v[j], uv[j]);
            }
        }
#endif
        bool any = false;  // the same for the whole block
        #pragma unroll
        for (int q = 0; q < ROWS; ++q) any |= base + q < n_rows && mask[base + q < n_rows ? base + q : 0];
        if (!any) {  // padding only: nothing counted
            if (t == 0 && row < n_rows) {
                for (int q = 0; q < 4; ++q) row_f[q * n_rows + row] = 0.f;
                for (int q = 0; q < 3; ++q) row_i[q * n_rows + row] = 0;
                row_key[row] = -1;
            }
            continue;
        }
        // the extremes start at the largest finite bf16, so a thread with no values marks nothing bad
        unsigned hi2 = 0xFF7FFF7Fu, lo2 = 0x7F7F7F7Fu;
        float s_even = 0.f, s_odd = 0.f, sq_even = 0.f, sq_odd = 0.f;
        #pragma unroll
        for (int j = 0; j < VEC; ++j) {
            if (counted && j * GROUP + t < n4) {
                const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                #pragma unroll
                for (int k = 0; k < 4; ++k) {
                    hi2 = bf2_max_nan(hi2, w[k]);
                    lo2 = bf2_min_nan(lo2, w[k]);
                    const float f0 = lo_of(w[k]), f1 = hi_of(w[k]);
                    s_even += f0; s_odd += f1;
                    sq_even = fmaf(f0, f0, sq_even); sq_odd = fmaf(f1, f1, sq_odd);
                    count(h, (w[k] << 1) & 0xFFFCu);
                    count(h, (w[k] >> 15) & 0xFFFCu);
                }
            }
        }
        unsigned bad = nonfinite2(hi2) + nonfinite2(lo2) != 0;
        const float t_hi = fmaxf(lo_of(hi2), hi_of(hi2)), t_lo = fminf(lo_of(lo2), hi_of(lo2));
        float hi = t_hi, lo = t_lo, s = s_even + s_odd, sq = sq_even + sq_odd;
        // every lane of a butterfly ends with the same value, so the order of addition is fixed
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            hi = fmaxf(hi, __shfl_xor_sync(FULL, hi, o));
            lo = fminf(lo, __shfl_xor_sync(FULL, lo, o));
            s += __shfl_xor_sync(FULL, s, o);
            sq += __shfl_xor_sync(FULL, sq, o);
        }
        bad = __any_sync(FULL, bad);
        if (lane == 0) { w_hi[warp] = hi; w_lo[warp] = lo; w_s[warp] = s; w_sq[warp] = sq; w_bad[warp] = bad; }
        __syncthreads();
        hi = w_hi[w0]; lo = w_lo[w0]; s = w_s[w0]; sq = w_sq[w0]; bad = w_bad[w0];
        #pragma unroll
        for (int q = 1; q < GROUP_WARPS; ++q) {
            hi = fmaxf(hi, w_hi[w0 + q]); lo = fminf(lo, w_lo[w0 + q]); s += w_s[w0 + q]; sq += w_sq[w0 + q];
            bad |= w_bad[w0 + q];
        }
        const bool valid = counted && !bad;
        const bool positive = hi >= -lo;
        const float tabs = fabsf(positive ? hi : lo);  // +0, not -0, for a row of -0
        const float ext = positive ? hi : lo;
        int first = 0x7FFFFFFF, below = 0;
        if (valid) {
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) cmax[j * 4 + k] = bf2_max(cmax[j * 4 + k], w[k] & 0x7FFF7FFFu);
                }
            }
#if MASSIVE
            // |a| < tabs / ratio, compared as bits: a << 16 < thr for a bf16 magnitude a exactly when
            // a < ceil(thr / 65536)
            const unsigned thr = __float_as_uint((float)((double)tabs / MASSIVE_RATIO));
            const unsigned t16 = (thr + 0xFFFFu) >> 16, t2 = t16 | (t16 << 16);
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) below += below16(w[k] & 0x7FFF7FFFu, t2);
                }
            }
            below >>= 4;
#endif
        }
        if (counted && bad) {  // its inf and NaN were counted as overflow: move them
            int n = 0;
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) n += nonfinite2(w[k]);
                }
            }
            if (n) { atomicSub(&h[OVERFLOW], (unsigned)n); atomicAdd(&h[NONFINITE], (unsigned)n); }
        }
        // only a thread whose own extreme is the row's holds the row's first channel of it
        if (counted && (positive ? t_hi : t_lo) == ext) {
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int c = j * GROUP + t;
                if (c < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        const unsigned word = w[k >> 1];
                        if (first == 0x7FFFFFFF && (k & 1 ? hi_of(word) : lo_of(word)) == ext) first = c * 8 + k;
                    }
                }
            }
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            first = min(first, __shfl_xor_sync(FULL, first, o));
            below += __shfl_xor_sync(FULL, below, o);
        }
        if (lane == 0) { w_first[warp] = first; w_below[warp] = below; }
        __syncthreads();
        if (t == 0 && row < n_rows) {
            for (int q = 1; q < GROUP_WARPS; ++q) { first = min(first, w_first[w0 + q]); below += w_below[w0 + q]; }
            long long key = -1;
            if (counted) {
                row_f[row] = hi; row_f[n_rows + row] = lo; row_f[2 * n_rows + row] = s; row_f[3 * n_rows + row] = sq;
                row_i[row] = valid; row_i[n_rows + row] = below; row_i[2 * n_rows + row] = first;
            } else {
                for (int q = 0; q < 4; ++q) row_f[q * n_rows + row] = 0.f;
                for (int q = 0; q < 3; ++q) row_i[q * n_rows + row] = 0;
            }
            if (valid) {
                key = ((long long)__float_as_uint(tabs) << 32) | (0xFFFFFFFFLL - token[row]);
                atomicMax(sample_max + sample[row / tokens_per_row], __float_as_uint(tabs));
                p_sum += (double)s; p_sq += (double)sq;
                p_hi = fmaxf(p_hi, hi); p_lo = fminf(p_lo, lo);
                p_valid += 1;
                p_massive += (tabs > MASSIVE_ABS) && (below >= (width - 1) / 2 + 1);
            } else if (counted) {
                p_bad += 1;
            }
            row_key[row] = key;
#if FOLD
            // staged for the top-K when its key beats the stored K-th (only the last block writes that)
            if (key > topk_key[top_k - 1]) {
                const unsigned at = atomicAdd(counters + 1, 1u);
                stage_key[at] = key; stage_row[at] = row;
            }
#endif
        }
    }
    __syncthreads();
    // the table into the int64 histogram: one add per non-empty counter
    for (int i = tid; i < TABLE / 4; i += THREADS) {
        const uint4 c4 = reinterpret_cast<const uint4*>(h)[i];
        if (c4.x | c4.y | c4.z | c4.w) {
            const unsigned c[4] = {c4.x, c4.y, c4.z, c4.w};
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (c[q]) atomicAdd(counts + 4 * i + q, (unsigned long long)c[q]);
            }
        }
    }
    // the column maxima, skipping the atomic where the stored value is already as large
    #pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = j * GROUP + t;
        if (c < n4) {
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int col = c * 8 + 2 * k;
                const unsigned even = cmax[j * 4 + k] << 16, odd = cmax[j * 4 + k] & 0xFFFF0000u;
                if (even > channel_max[col]) atomicMax(channel_max + col, even);
                if (odd > channel_max[col + 1]) atomicMax(channel_max + col + 1, odd);
            }
        }
    }
    if (t == 0) {
        const int b = blockIdx.x * ROWS + g;
        part_f[b] = p_sum; part_f[n_parts + b] = p_sq; part_f[2 * n_parts + b] = (double)p_hi;
        part_f[3 * n_parts + b] = (double)p_lo;
        part_i[b] = p_valid; part_i[n_parts + b] = p_bad; part_i[2 * n_parts + b] = p_massive;
    }
#if FOLD
    // The fold: the last block to take a ticket adds the partials, in a fixed order, and merges the
    // staged rows into the stored top-K (the Triton fold's work, without a launch of its own). The
    // other blocks' rows, partials and staged keys are read through L2 (__ldcg), after the fences.
    __shared__ unsigned last;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    double f_s = 0.0, f_sq = 0.0;
    float f_hi = -inf, f_lo = inf;
    long long f_valid = 0, f_bad = 0, f_massive = 0;
    for (int p = tid; p < n_parts; p += THREADS) {
        f_s += __ldcg(part_f + p); f_sq += __ldcg(part_f + n_parts + p);
        f_hi = fmaxf(f_hi, (float)__ldcg(part_f + 2 * n_parts + p));
        f_lo = fminf(f_lo, (float)__ldcg(part_f + 3 * n_parts + p));
        f_valid += __ldcg(part_i + p); f_bad += __ldcg(part_i + n_parts + p); f_massive += __ldcg(part_i + 2 * n_parts + p);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        f_s += __shfl_xor_sync(FULL, f_s, o); f_sq += __shfl_xor_sync(FULL, f_sq, o);
        f_hi = fmaxf(f_hi, __shfl_xor_sync(FULL, f_hi, o)); f_lo = fminf(f_lo, __shfl_xor_sync(FULL, f_lo, o));
        f_valid += __shfl_xor_sync(FULL, f_valid, o); f_bad += __shfl_xor_sync(FULL, f_bad, o);
        f_massive += __shfl_xor_sync(FULL, f_massive, o);
    }
    // the histogram's table is free now: the warps' sums, then their top-K lists, go there
    double* m_f = reinterpret_cast<double*>(h);                      // [2][WARPS]
    long long* m_i = reinterpret_cast<long long*>(m_f + 2 * WARPS);  // [3][WARPS]
    long long* m_key = m_i + 3 * WARPS;                              // [WARPS][16]
    int* m_row = reinterpret_cast<int*>(m_key + 16 * WARPS);         // [WARPS][16]
    if (lane == 0) {
        m_f[warp] = f_s; m_f[WARPS + warp] = f_sq; w_hi[warp] = f_hi; w_lo[warp] = f_lo;
        m_i[warp] = f_valid; m_i[WARPS + warp] = f_bad; m_i[2 * WARPS + warp] = f_massive;
    }
    // each warp's 16 largest staged keys
    const int n_staged = (int)__ldcg(counters + 1);
    long long lk = -1;
    int lr = 0;
    merge_all<true>(lk, lr, stage_key, stage_row, n_staged, warp * 32, THREADS, lane);
    if (lane < 16) { m_key[warp * 16 + lane] = lk; m_row[warp * 16 + lane] = lr; }
    __syncthreads();
    if (warp != 0) return;
    if (lane == 0) {
        for (int q = 1; q < WARPS; ++q) {
            f_s += m_f[q]; f_sq += m_f[WARPS + q]; f_hi = fmaxf(f_hi, w_hi[q]); f_lo = fminf(f_lo, w_lo[q]);
            f_valid += m_i[q]; f_bad += m_i[WARPS + q]; f_massive += m_i[2 * WARPS + q];
        }
        *acc_sum += f_s; *acc_sumsq += f_sq; *acc_max = fmaxf(*acc_max, f_hi); *acc_min = fminf(*acc_min, f_lo);
        *acc_count += f_valid * width; *acc_nonfinite += f_bad; *acc_massive += f_massive;
        counters[0] = 0u; counters[1] = 0u;  // for the next update
    }
    merge_all<false>(lk, lr, m_key + 16, m_row + 16, 16 * (WARPS - 1), 0, 32, lane);
    // the union of the stored top-K (lanes 0..15: slot = lane) and the new list (lanes 16..31: the
    // list's entry lane - 16), each entry ranked as the Triton fold ranks it
    const bool is_old = lane < 16, in_k = is_old && lane < top_k;
    const long long new_key = __shfl_sync(FULL, lk, lane & 15);
    const int new_row = __shfl_sync(FULL, lr, lane & 15);
    const long long old_key = in_k ? topk_key[lane] : -1LL;
    const float old_value = in_k ? topk_value[lane] : 0.f, old_median = in_k ? topk_median[lane] : 0.f;
    const long long old_channel = in_k ? topk_channel[lane] : 0LL, old_token = in_k ? topk_token[lane] : 0LL;
    const long long mine = is_old ? old_key : new_key;
    int rank = is_old ? lane : 0;
    #pragma unroll
    for (int q = 0; q < 16; ++q) {
        const long long o = __shfl_sync(FULL, old_key, q), n = __shfl_sync(FULL, lk, q);
        rank += is_old ? (n >= 0 && n > mine) : (n > mine) + (q < top_k && o >= mine);
    }
    __syncwarp();  // every lane has read the stored top-K before any lane writes it
    if (in_k && rank < top_k) {
        topk_key[rank] = old_key; topk_value[rank] = old_value; topk_channel[rank] = old_channel;
        topk_token[rank] = old_token; topk_median[rank] = old_median; source[rank] = -1;
    } else if (!is_old && new_key >= 0 && rank < top_k) {
        const float t_max = __ldcg(row_f + new_row), t_min = __ldcg(row_f + n_rows + new_row);
        topk_key[rank] = new_key; topk_value[rank] = t_max >= -t_min ? t_max : t_min;
        topk_channel[rank] = __ldcg(row_i + 2 * n_rows + new_row); topk_token[rank] = ids[new_row];
        topk_median[rank] = 0.f; source[rank] = new_row;
    }
#endif
}
