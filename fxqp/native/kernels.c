/* Fused CPU kernels of the eager weight chain (mask, range, rounding onto the grid).
 *
 * A weight is seen as C rows of K contiguous float32 values: row c is output channel c
 * (C == 1 for a per-tensor grid). The work is cut into C * P blocks, block j being part
 * j % P of row j / P, so that a per-tensor grid (one row) is split across threads too.
 * The optional mask m holds 0 or 1 per element (a bool tensor's bytes); the masked value
 * is x * (float)m, the same float multiply as torch's x * mask.float(). Row c reads the
 * mask from m + c * ms: ms == K for a mask of x's shape, ms == 0 for one row's mask that
 * every row shares.
 *
 * Every result is the one the torch op chain computes, element for element: the same
 * IEEE operations in the same order (a multiply, a division by the scale, round half to
 * even, the clamp, a multiply by the scale). Compiled with -ffp-contract=off so that no
 * multiply and add are fused into one rounding.
 */
#include <math.h>
#include <stdint.h>

static inline int64_t part_begin(int64_t K, int64_t P, int64_t p) { return K * p / P; }

/* Block j of C * P: its row c and its span [b, e) of that row. */
static inline void block_of(int64_t j, int64_t K, int64_t P, int64_t *c, int64_t *b, int64_t *e) {
    *c = j / P;
    *b = part_begin(K, P, j % P);
    *e = part_begin(K, P, j % P + 1);
}

/* Min and max of the (masked) values x[b..e), NaN when one of them is NaN (as torch's amin /
 * amax propagate it). */
static inline void range_of(const float *restrict x, const uint8_t *restrict m, int64_t b, int64_t e, float *lo, float *hi) {
    float mn = INFINITY, mx = -INFINITY;
    int nan = 0;
    if (m) {
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nan)
        for (int64_t k = b; k < e; ++k) {
            const float v = x[k] * (float)m[k];
            nan |= v != v;
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
    } else {
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : nan)
        for (int64_t k = b; k < e; ++k) {
            const float v = x[k];
            nan |= v != v;
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
    }
    *lo = nan ? NAN : mn;
    *hi = nan ? NAN : mx;
}

/* Per block: min and max of the (masked) values; lo and hi have C * P entries. */
void fxqp_block_range(const float *restrict x, const uint8_t *restrict m, int64_t ms, int64_t C, int64_t K, int64_t P,
                      float *restrict lo, float *restrict hi, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < C * P; ++j) {
        int64_t c, b, e;
        block_of(j, K, P, &c, &b, &e);
        range_of(x + c * K, m ? m + c * ms : 0, b, e, lo + j, hi + j);
    }
}

/* oc[b..e) = round(v / s) * s (symmetric grid, has_z == 0: the scale covers the row's range,
 * so no clamp) or (clamp(round(v / s) + z, qmin, qmax) - z) * s (affine grid), with
 * v = xc * mc when a mask is given. */
static inline void round_span(const float *restrict xc, const uint8_t *restrict mc, int64_t b, int64_t e, float sc,
                              int has_z, float zc, float qmin, float qmax, float *restrict oc) {
    if (has_z) {
        if (mc) {
#pragma omp simd
            for (int64_t k = b; k < e; ++k) {
                float r = nearbyintf(xc[k] * (float)mc[k] / sc) + zc;
                r = r < qmin ? qmin : r;
                r = r > qmax ? qmax : r;
                oc[k] = (r - zc) * sc;
            }
        } else {
#pragma omp simd
            for (int64_t k = b; k < e; ++k) {
                float r = nearbyintf(xc[k] / sc) + zc;
                r = r < qmin ? qmin : r;
                r = r > qmax ? qmax : r;
                oc[k] = (r - zc) * sc;
            }
        }
    } else if (mc) {
#pragma omp simd
        for (int64_t k = b; k < e; ++k) oc[k] = nearbyintf(xc[k] * (float)mc[k] / sc) * sc;
    } else {
#pragma omp simd
        for (int64_t k = b; k < e; ++k) oc[k] = nearbyintf(xc[k] / sc) * sc;
    }
}

/* round_span of every block, onto row c's grid (s_c, and z_c unless z == NULL: symmetric). */
void fxqp_round_to_grid(const float *restrict x, const uint8_t *restrict m, int64_t ms, int64_t C, int64_t K, int64_t P,
                        const float *restrict s, const float *restrict z, float qmin, float qmax,
                        float *restrict out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < C * P; ++j) {
        int64_t c, b, e;
        block_of(j, K, P, &c, &b, &e);
        round_span(x + c * K, m ? m + c * ms : 0, b, e, s[c], z != 0, z ? z[c] : 0.f, qmin, qmax, out + c * K);
    }
}

/* Per-channel weight quantization in one pass over memory: for each row, its range of v = x * m
 * (read from memory), its grid, then the row again (from the cache) onto the grid. The grid is
 * the one fxqp's torch ops compute from the range, operation for operation (float32):
 *   symmetric (z == NULL): a = max(hi, -lo), s = max(a / qmax, eps), out = round(v / s) * s;
 *   affine: lo' = min(lo, 0), hi' = max(hi, 0), s = max((hi' - lo') / qmax, eps),
 *           z = clamp(round(-lo' / s), 0, qmax), out = (clamp(round(v / s) + z, 0, qmax) - z) * s;
 * a NaN in the row makes the range, the scale and the row's output NaN, as in torch. */
static inline float nan_max(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }
static inline float nan_min(float a, float b) { return (a != a || b != b) ? NAN : (a < b ? a : b); }

void fxqp_quantize_rows(const float *restrict x, const uint8_t *restrict m, int64_t C, int64_t K, int symmetric,
                        float qmax, float eps, float *restrict out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < C; ++c) {
        const float *xc = x + c * K;
        const uint8_t *mc = m ? m + c * K : 0;
        float *oc = out + c * K;
        float lo, hi;
        range_of(xc, mc, 0, K, &lo, &hi);
        float sc, zc = 0.f;
        if (symmetric) {
            sc = nan_max(hi, -lo) / qmax;
        } else {
            const float lo0 = nan_min(lo, 0.f), hi0 = nan_max(hi, 0.f);
            sc = (hi0 - lo0) / qmax;
        }
        sc = sc < eps ? eps : sc; /* NaN stays NaN, as in clamp_min */
        if (!symmetric) {
            zc = nearbyintf(-nan_min(lo, 0.f) / sc);
            zc = zc < 0.f ? 0.f : zc;
            zc = zc > qmax ? qmax : zc;
        }
        round_span(xc, mc, 0, K, sc, !symmetric, zc, 0.f, qmax, oc);
    }
}

/* out = g * m over n elements, in blocks of `block` (the gradient of x * m). */
void fxqp_mask_multiply(const float *restrict g, const uint8_t *restrict m, int64_t n, int64_t block,
                        float *restrict out, int nthreads) {
    const int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < blocks; ++j) {
        const int64_t b = j * block, e = b + block < n ? b + block : n;
#pragma omp simd
        for (int64_t i = b; i < e; ++i) out[i] = g[i] * (float)m[i];
    }
}
