/* Fused tile transforms for ops/winograd_conv.py's F(4x4, 3x3) convolution on CPU (fp32).

   Why: in PyTorch each transform is a layout copy plus a 36x36 (or 16x36) matrix product
   over the band's tiles, and both are bound by this CPU's memory bandwidth: a 256->256
   convolution at 64x64 spent ~70 of its ~120 ms (forward + backward) there, against ~50
   in the channel GEMMs. Here each transform reads its input once and writes its output
   once, with the 1-D transforms written out (most entries of B^T and A^T are 0 or +-1).

   Layouts are those of ops/winograd_conv.py: one image's N-C-H-W plane stack [C][H][W];
   transformed tiles [36][tiles][C] with p = 6*row + col inside the tile and the band's
   tiles row-major; channels are processed in blocks of 16 (one AVX-512 register per
   tile position) so every store of transformed tiles is one contiguous 64-byte run.
   Tile row tr covers input rows 4*tr-1 .. 4*tr+4 (the convolution's padding of 1) and
   output rows 4*tr .. 4*tr+3; positions outside the image read as zero and are never
   written.

   Threads: OpenMP, sharing the runtime torch already loaded (libgomp.so.1), with the
   thread count torch uses. */

#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
#define LANES 16

static inline long min_l(long a, long b) { return a < b ? a : b; }

/* The 1-D transforms, each on six (or four) vectors k apart and into o[0..]. */

/* o = B^T d (6 -> 6), B^T as in Lavin & Gray (interpolation points 0, +-1, +-2, inf). */
static inline void bt6(const v16 *d, long k, v16 *o) {
    const v16 d0 = d[0], d1 = d[k], d2 = d[2 * k], d3 = d[3 * k], d4 = d[4 * k], d5 = d[5 * k];
    v16 a = d4 - 4.0f * d2, b = d3 - 4.0f * d1, c = d4 - d2, e = 2.0f * (d3 - d1);
    o[0] = 4.0f * d0 - 5.0f * d2 + d4;
    o[1] = a + b;
    o[2] = a - b;
    o[3] = c + e;
    o[4] = c - e;
    o[5] = 4.0f * d1 - 5.0f * d3 + d5;
}

/* o = B g (6 -> 6): the adjoint of bt6. */
static inline void b6(const v16 *g, long k, v16 *o) {
    const v16 g0 = g[0], g1 = g[k], g2 = g[2 * k], g3 = g[3 * k], g4 = g[4 * k], g5 = g[5 * k];
    o[0] = 4.0f * g0;
    o[1] = 4.0f * (g2 - g1 + g5) + 2.0f * (g4 - g3);
    o[2] = -5.0f * g0 - 4.0f * (g1 + g2) - (g3 + g4);
    o[3] = (g1 - g2) + 2.0f * (g3 - g4) - 5.0f * g5;
    o[4] = g0 + g1 + g2 + g3 + g4;
    o[5] = g5;
}

/* o = A^T m (6 -> 4). */
static inline void at4(const v16 *m, long k, v16 *o) {
    const v16 m0 = m[0], m1 = m[k], m2 = m[2 * k], m3 = m[3 * k], m4 = m[4 * k], m5 = m[5 * k];
    v16 s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
    o[0] = m0 + s12 + s34;
    o[1] = d12 + 2.0f * d34;
    o[2] = s12 + 4.0f * s34;
    o[3] = d12 + 8.0f * d34 + m5;
}

/* o = A g (4 -> 6): the adjoint of at4. */
static inline void a6(const v16 *g, long k, v16 *o) {
    const v16 g0 = g[0], g1 = g[k], g2 = g[2 * k], g3 = g[3 * k];
    o[0] = g0;
    o[1] = g0 + g1 + g2 + g3;
    o[2] = g0 - g1 + g2 - g3;
    o[3] = g0 + 2.0f * g1 + 4.0f * g2 + 8.0f * g3;
    o[4] = g0 - 2.0f * g1 + 4.0f * g2 - 8.0f * g3;
    o[5] = g3;
}

static inline v16 load_lanes(const float *p, long n) {
    v16 v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}

static inline void store_lanes(float *p, v16 v, long n) { memcpy(p, &v, (size_t)n * sizeof(float)); }

/* The 36 transformed values of one tile, channels c0 .. c0+n, from T[36][tiles][C]. */
static inline void load_tile(const float *T, long tiles, long C, long tile, long c0, long n, v16 *out) {
    for (int p = 0; p < 36; p++) out[p] = load_lanes(T + (p * tiles + tile) * C + c0, n);
}

/* rows[r][col] (lane = channel) <- x[c0 + lane][y0 + r][col - 1] for r < nrows, zero outside the image. */
static void gather_rows(const float *x, long H, long W, long c0, long nc, long y0, long nrows, long cols, v16 *rows) {
    memset(rows, 0, (size_t)(nrows * cols) * sizeof(v16));
    for (long r = 0; r < nrows; r++) {
        long y = y0 + r;
        if (y < 0 || y >= H) continue;
        float *dst = (float *)(rows + r * cols);
        for (long lane = 0; lane < nc; lane++) {
            const float *src = x + ((c0 + lane) * H + y) * W;
            for (long col = 1; col < cols && col - 1 < W; col++) dst[col * LANES + lane] = src[col - 1];
        }
    }
}

/* V[36][tiles][C] <- B^T d B for every 6x6 input tile d of tile rows r0..r1 of one image. */
void wino_input_tiles(const float *x, long C, long H, long W, long r0, long r1, long tw, float *V, int threads) {
    const long tiles = (r1 - r0) * tw, cols = 4 * tw + 2, blocks = (C + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads)
    {
        v16 *rows = aligned_alloc(64, (size_t)(12 * cols) * sizeof(v16));
        v16 *t = rows + 6 * cols;
#pragma omp for collapse(2) schedule(static)
        for (long cb = 0; cb < blocks; cb++) {
            for (long tr = r0; tr < r1; tr++) {
                const long c0 = cb * LANES, nc = min_l(LANES, C - c0);
                gather_rows(x, H, W, c0, nc, 4 * tr - 1, 6, cols, rows);
                for (long col = 0; col < cols; col++) {  /* along the tile's rows: t = B^T d */
                    v16 o[6];
                    bt6(rows + col, cols, o);
                    for (int i = 0; i < 6; i++) t[i * cols + col] = o[i];
                }
                for (long tc = 0; tc < tw; tc++) {  /* along its columns: (B^T d) B */
                    const long tile = (tr - r0) * tw + tc;
                    for (int i = 0; i < 6; i++) {
                        v16 o[6];
                        bt6(t + i * cols + 4 * tc, 1, o);
                        for (int j = 0; j < 6; j++) store_lanes(V + ((6 * i + j) * tiles + tile) * C + c0, o[j], nc);
                    }
                }
            }
        }
        free(rows);
    }
}

/* out[K][H][W] (one image) <- A^T m A (+ bias) for tile rows r0..r1, from M[36][tiles][K]. */
void wino_output_tiles(const float *M, const float *bias, long K, long H, long W, long r0, long r1, long tw,
                       float *out, int threads) {
    const long tiles = (r1 - r0) * tw, cols = 4 * tw, blocks = (K + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads)
    {
        v16 *rows = aligned_alloc(64, (size_t)(4 * cols) * sizeof(v16));
#pragma omp for collapse(2) schedule(static)
        for (long kb = 0; kb < blocks; kb++) {
            for (long tr = r0; tr < r1; tr++) {
                const long k0 = kb * LANES, nk = min_l(LANES, K - k0);
                const v16 b = bias ? load_lanes(bias + k0, nk) : (v16){0};
                for (long tc = 0; tc < tw; tc++) {
                    const long tile = (tr - r0) * tw + tc;
                    v16 m[36], s[6][4];
                    load_tile(M, tiles, K, tile, k0, nk, m);
                    for (int i = 0; i < 6; i++) at4(m + 6 * i, 1, s[i]);
                    for (int bcol = 0; bcol < 4; bcol++) {
                        v16 y[4];
                        at4(&s[0][bcol], 4, y);
                        for (int a = 0; a < 4; a++) rows[a * cols + 4 * tc + bcol] = y[a] + b;
                    }
                }
                for (long a = 0; a < 4; a++) {
                    const long y = 4 * tr + a;
                    if (y >= H) break;
                    const float *src = (const float *)(rows + a * cols);
                    for (long lane = 0; lane < nk; lane++) {
                        float *dst = out + ((k0 + lane) * H + y) * W;
                        for (long col = 0; col < W; col++) dst[col] = src[col * LANES + lane];
                    }
                }
            }
        }
        free(rows);
    }
}

/* gradM[36][tiles][K] <- A^T-adjoint of the output gradient g[K][H][W] (one image):
   gradM[6i+j] = sum_ab AT[a][i] AT[b][j] g[4tr+a][4tc+b]. */
void wino_grad_output_tiles(const float *g, long K, long H, long W, long r0, long r1, long tw, float *gradM,
                            int threads) {
    const long tiles = (r1 - r0) * tw, cols = 4 * tw + 1, blocks = (K + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads)
    {
        v16 *rows = aligned_alloc(64, (size_t)(4 * cols) * sizeof(v16));
#pragma omp for collapse(2) schedule(static)
        for (long kb = 0; kb < blocks; kb++) {
            for (long tr = r0; tr < r1; tr++) {
                const long k0 = kb * LANES, nk = min_l(LANES, K - k0);
                /* gather_rows shifts by one column (the input's padding); column 0 is unused here */
                gather_rows(g, H, W, k0, nk, 4 * tr, 4, cols, rows);
                for (long tc = 0; tc < tw; tc++) {
                    const long tile = (tr - r0) * tw + tc;
                    v16 h[4][6];
                    for (int a = 0; a < 4; a++) a6(rows + a * cols + 4 * tc + 1, 1, h[a]);
                    for (int j = 0; j < 6; j++) {
                        v16 o[6];
                        a6(&h[0][j], 6, o);
                        for (int i = 0; i < 6; i++) store_lanes(gradM + ((6 * i + j) * tiles + tile) * K + k0, o[i], nk);
                    }
                }
            }
        }
        free(rows);
    }
}

/* grad_x[C][H][W] (one image) <- the B-adjoint of gradV[36][tiles][C], overlap-added.
   Bands must come in increasing r0 per image: the two input rows a band shares with the
   previous one (4*r0-1 and 4*r0) are added to, every other row is written. */
void wino_grad_input_fold(const float *gradV, long C, long H, long W, long r0, long r1, long tw, float *grad_x,
                          int threads) {
    const long tiles = (r1 - r0) * tw, cols = 4 * tw + 2, nrows = 4 * (r1 - r0) + 2;
    const long blocks = (C + LANES - 1) / LANES;
#pragma omp parallel num_threads(threads)
    {
        v16 *acc = aligned_alloc(64, (size_t)(nrows * cols) * sizeof(v16));
#pragma omp for schedule(static)
        for (long cb = 0; cb < blocks; cb++) {
            const long c0 = cb * LANES, nc = min_l(LANES, C - c0);
            memset(acc, 0, (size_t)(nrows * cols) * sizeof(v16));
            for (long tr = r0; tr < r1; tr++) {
                for (long tc = 0; tc < tw; tc++) {
                    const long tile = (tr - r0) * tw + tc;
                    v16 gv[36], q[6][6];
                    load_tile(gradV, tiles, C, tile, c0, nc, gv);
                    for (int i = 0; i < 6; i++) b6(gv + 6 * i, 1, q[i]);
                    for (int s = 0; s < 6; s++) {
                        v16 d[6];
                        b6(&q[0][s], 6, d);
                        for (int r = 0; r < 6; r++) acc[(4 * (tr - r0) + r) * cols + 4 * tc + s] += d[r];
                    }
                }
            }
            for (long row = 0; row < nrows; row++) {
                const long y = 4 * r0 - 1 + row;
                if (y < 0 || y >= H) continue;
                const int add = r0 > 0 && y <= 4 * r0;
                const float *src = (const float *)(acc + row * cols);
                for (long lane = 0; lane < nc; lane++) {
                    float *dst = grad_x + ((c0 + lane) * H + y) * W;
                    if (add) {
                        for (long col = 0; col < W; col++) dst[col] += src[(col + 1) * LANES + lane];
                    } else {
                        for (long col = 0; col < W; col++) dst[col] = src[(col + 1) * LANES + lane];
                    }
                }
            }
        }
        free(acc);
    }
}
