// Convolutions of K stacked networks on a CPU, members interleaved: the member index is the innermost
// axis of every tensor, so one SIMD vector holds the same channel of 8 or 16 networks and every
// multiply-add is useful. (A grouped convolution in oneDNN pads each network's few channels to a
// 16-channel block; with 6 channels per network most of its arithmetic is on padding.)
//
// Layouts (K members, T = k*k taps, "same" padding k/2, stride s):
//   x   (B, H, W, Ci, K)      input
//   wv  (T, Ci, Co, K)        weights, wv[t][i][o][m] = weight of member m, out o, in i, tap t
//   out (B, Ho, Wo, Co, K)    output
// Built by kt_mlflow/blocks/native.py with the machine's C++ compiler; plain C++ with GCC/Clang vector
// extensions (no intrinsics), so it compiles for whatever SIMD width the machine has.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

// Register tiles sized for the machine's SIMD registers (-D overrides, for benchmarks).
#ifndef KT_VBYTES
#if defined(__AVX512F__)
#define KT_VBYTES 64
#else
#define KT_VBYTES 32
#endif
#endif
#ifndef KT_OB
#define KT_OB 6
#endif
#ifndef KT_P
#define KT_P 4
#endif
#ifndef KT_IB
#define KT_IB 3
#endif
// The forward's tile: with 16 vector registers (AVX2) 6 outputs x 4 positions spill their accumulators,
// so it holds 3 x 4 there, with each position's input pinned in a register (else GCC folds the input
// into every multiply-add that uses it). 32 registers (AVX-512) hold 6 x 4.
#ifndef KT_FOB
#if KT_VBYTES == 64
#define KT_FOB KT_OB
#else
#define KT_FOB (KT_OB < 3 ? KT_OB : 3)
#endif
#endif
#ifndef KT_XREG
#define KT_XREG (KT_VBYTES != 64)
#endif
static_assert(KT_OB >= 1 && KT_OB <= 6, "with_block dispatches output blocks of 1 to 6");
static_assert(KT_FOB >= 1 && KT_FOB <= KT_OB, "the forward splits blocks of KT_OB outputs into tiles of KT_FOB");
static_assert(KT_IB >= 1 && KT_IB <= 3, "BackwardWeightAll dispatches input blocks of 1 to 3");
static_assert(KT_P >= 1, "a forward tile holds at least one position");

namespace {

template <typename T>
struct Vec {
    typedef T type __attribute__((vector_size(KT_VBYTES), aligned(sizeof(T))));
};

template <typename W, typename T>
inline W load(const T* p) { W v; std::memcpy(&v, p, sizeof(W)); return v; }
template <typename W, typename T>
inline void store(T* p, W v) { std::memcpy(p, &v, sizeof(W)); }

// Keeps a loaded vector in a register: without it GCC folds the load into every multiply-add that uses
// the value (a tile of P positions then loads each weight P times, and the loads, not the FMAs, limit).
// A vector wider than the machine's registers (a KT_VBYTES=64 build on AVX2) fits no register: left alone.
template <typename W>
inline void in_register(W& v) {
#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__AVX512F__)
    constexpr unsigned long widest = 64;
#else
    constexpr unsigned long widest = 32;
#endif
    if constexpr (sizeof(W) <= widest) __asm__("" : "+v"(v));
#else
    (void)v;
#endif
}

// 64-byte aligned memory for the kernels' scratch buffers: their vectors then never span two cache lines
// (std::vector's default gives 16 bytes; a split load or store costs two).
template <typename T>
struct Aligned {
    typedef T value_type;
    Aligned() = default;
    template <typename U>
    Aligned(const Aligned<U>&) {}
    T* allocate(std::size_t n) {
        if (void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)) return static_cast<T*>(p);
        throw std::bad_alloc();
    }
    void deallocate(T* p, std::size_t) { std::free(p); }
    template <typename U>
    bool operator==(const Aligned<U>&) const { return true; }
    template <typename U>
    bool operator!=(const Aligned<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, Aligned<T>>;

struct Shape {
    long B, H, W, Ci, Co, K, k, s, Ho, Wo;
    long pad() const { return k / 2; }
    long x_at(long b, long h, long w, long c) const { return (((b * H + h) * W + w) * Ci + c) * K; }
    long out_at(long b, long h, long w, long c) const { return (((b * Ho + h) * Wo + w) * Co + c) * K; }
    long w_at(long t, long i, long o) const { return ((t * Ci + i) * Co + o) * K; }
};

// Calls f.template run<N>() with the compile-time block size N = min(n, KT_OB): register tiles of fixed size.
template <typename F>
inline void with_block(long n, F&& f) {
    switch (std::min<long>(n, KT_OB)) {
        case 6: f.template run<6>(); break;
        case 5: f.template run<5>(); break;
        case 4: f.template run<4>(); break;
        case 3: f.template run<3>(); break;
        case 2: f.template run<2>(); break;
        default: f.template run<1>(); break;
    }
}

// Every image, every lane chunk (full vectors, then single lanes for a remainder of members).
template <typename T, typename Body>
inline void each_image_and_lanes(const Shape& S, Body&& body) {
    typedef typename Vec<T>::type W;
    const long lanes = sizeof(W) / sizeof(T);
    for (long b = 0; b < S.B; ++b) {
        long m = 0;
        for (; m + lanes <= S.K; m += lanes) body.template run<W>(b, m);
        for (; m < S.K; ++m) body.template run<T>(b, m);
    }
}

// ---- forward: OB outputs x P neighbouring positions in registers; lanes m .. m + |W| of the members.
// `xi` is one image with S.pad() zero rows and columns around it (`Padded`), so every tile reads inside
// it and one branch-free loop serves the border tiles too. The padding's products add +0 or -0 to sums
// that start at +0 (which no sum then leaves for -0), so every sum keeps the bits it has without them.
// With a per-channel shift (interleaved (Co, K)) each output is stored as relu(output + shift): an
// eval-mode BN (its scale folded into the weights) and its ReLU then cost no pass over memory of their own.
// Not inlined: inside the row loop GCC spilled the tile's registers (1.1x-1.4x slower on AVX2).
template <typename T, typename W, int OB, int P>
__attribute__((noinline)) void forward_tile(const Shape& S, const T* xi, const T* wv, T* out, long ho, long wo,
                                            long o0, long m, const T* shift) {
    W acc[P][OB];
    for (int p = 0; p < P; ++p)
        for (int o = 0; o < OB; ++o) acc[p][o] = W{};
    // per kernel row, the (column, input channel) pairs are consecutive in x and in the weights
    const long K = S.K, xrow = (S.W + 2 * S.pad()) * S.Ci * K, xstep = S.s * S.Ci * K, wstep = S.Co * K;
    const T* x0 = xi + ho * S.s * xrow + wo * xstep + m;
    const T* wp = wv + o0 * K + m;
    for (long dh = 0; dh < S.k; ++dh) {
        const T* xp = x0 + dh * xrow;
        for (long j = 0; j < S.k * S.Ci; ++j, xp += K, wp += wstep) {
            W w[OB];
            for (int o = 0; o < OB; ++o) { w[o] = load<W>(wp + o * K); in_register(w[o]); }
            for (int p = 0; p < P; ++p) {
                W xv = load<W>(xp + p * xstep);
                if (KT_XREG && sizeof(W) > sizeof(T)) in_register(xv);
                for (int o = 0; o < OB; ++o) acc[p][o] += xv * w[o];
            }
        }
    }
    T* op = out + S.out_at(0, ho, wo, o0) + m;
    for (int o = 0; o < OB; ++o) {
        const W sv = shift ? load<W>(shift + (o0 + o) * K + m) : W{};
        for (int p = 0; p < P; ++p) {
            W v = acc[p][o];
            if (shift) { v += sv; v = v > W{} ? v : W{}; }
            store(op + p * wstep + o * K, v);
        }
    }
}

template <typename T, typename W>
struct Forward {
    const Shape& S; const T* xi; const T* wv; T* out; long o0, m; const T* shift;
    template <int OB> void run() {
        for (long ho = 0; ho < S.Ho; ++ho) {
            long wo = 0;
            for (; wo + KT_P <= S.Wo; wo += KT_P) forward_tile<T, W, OB, KT_P>(S, xi, wv, out, ho, wo, o0, m, shift);
            // the row's last positions in one narrower tile (7 outputs: a tile of 4, then one of 3)
            for (; wo + 3 <= S.Wo; wo += 3) forward_tile<T, W, OB, 3>(S, xi, wv, out, ho, wo, o0, m, shift);
            for (; wo + 2 <= S.Wo; wo += 2) forward_tile<T, W, OB, 2>(S, xi, wv, out, ho, wo, o0, m, shift);
            for (; wo < S.Wo; ++wo) forward_tile<T, W, OB, 1>(S, xi, wv, out, ho, wo, o0, m, shift);
        }
    }
};

// Images of a batch with S.pad() zero rows and columns around them, one at a time in a buffer whose
// border is zeroed once (only the image's own rows are copied in per image).
template <typename T>
struct Padded {
    const Shape& S;
    Buffer<T> buf;
    explicit Padded(const Shape& shape)
        : S(shape), buf(S.pad() ? (S.H + 2 * S.pad()) * (S.W + 2 * S.pad()) * S.Ci * S.K : 0, T(0)) {}
    const T* image(const T* x, long b) {
        const T* xb = x + S.x_at(b, 0, 0, 0);
        if (!S.pad()) return xb;
        const long row = S.W * S.Ci * S.K, pad = S.pad() * S.Ci * S.K, prow = row + 2 * pad;
        T* dst = buf.data() + S.pad() * prow + pad;
        for (long h = 0; h < S.H; ++h) std::memcpy(dst + h * prow, xb + h * row, row * sizeof(T));
        return buf.data();
    }
};

// Blocks of outputs: KT_OB at a time, each split into tiles of at most KT_FOB outputs (vectors only) without
// a tile of one output that the KT_OB block did not have: GCC tunes a tile of one accumulator for Zen
// as a multiply and an add, not a fused multiply-add, so such a tile would change the sums' bits.
template <typename T>
struct ForwardBlocks {
    const Shape& S; const T* xi; const T* wv; T* out; const T* shift;
    template <typename W> void run(long, long m) {
        const long cap = sizeof(W) > sizeof(T) ? KT_FOB : KT_OB;
        for (long o0 = 0; o0 < S.Co; o0 += KT_OB) {
            const long n = std::min<long>(KT_OB, S.Co - o0);
            for (long done = 0, b; done < n; done += b) {
                const long left = n - done;
                b = left <= cap ? left : left == cap + 1 ? (left + 1) / 2 : cap;
                with_block(b, Forward<T, W>{S, xi, wv, out, o0 + done, m, shift});   // b <= n <= KT_OB
            }
        }
    }
};

// One padded image's output (Ho, Wo, Co, K): every lane chunk, every block of outputs.
template <typename T>
void forward_image(const Shape& S, const T* xi, const T* wv, T* out, const T* shift) {
    Shape one = S;
    one.B = 1;
    each_image_and_lanes<T>(one, ForwardBlocks<T>{S, xi, wv, out, shift});
}

template <typename T>
void forward_all(const Shape& S, const T* x, const T* wv, T* out, const T* shift = nullptr) {
    Padded<T> padded(S);
    for (long b = 0; b < S.B; ++b) forward_image<T>(S, padded.image(x, b), wv, out + S.out_at(b, 0, 0, 0), shift);
}

// ---- backward to the input: each output's gradient is scattered to the inputs it read (any stride).
template <typename T, typename W>
struct BackwardData {
    const Shape& S; const T* g; const T* wv; T* gx; long b, o0, m;
    template <int OB> void run() {
        for (long ho = 0; ho < S.Ho; ++ho)
            for (long wo = 0; wo < S.Wo; ++wo) {
                W gv[OB];
                for (int o = 0; o < OB; ++o) gv[o] = load<W>(g + S.out_at(b, ho, wo, o0 + o) + m);
                for (long dh = 0; dh < S.k; ++dh) {
                    const long hi = ho * S.s + dh - S.pad();
                    if (hi < 0 || hi >= S.H) continue;
                    for (long dw = 0; dw < S.k; ++dw) {
                        const long wi = wo * S.s + dw - S.pad();
                        if (wi < 0 || wi >= S.W) continue;
                        for (long i = 0; i < S.Ci; ++i) {
                            T* px = gx + S.x_at(b, hi, wi, i) + m;
                            W a = load<W>(px);
                            for (int o = 0; o < OB; ++o) a += gv[o] * load<W>(wv + S.w_at(dh * S.k + dw, i, o0 + o) + m);
                            store(px, a);
                        }
                    }
                }
            }
    }
};

// ---- backward to the weights: IB inputs x OB outputs of one tap in registers over one image.
template <typename T, typename W, int IB>
struct BackwardWeightTile {
    const Shape& S; const T* x; const T* g; T* gw; long b, t, i0, o0, m;
    template <int OB> void run() {
        const long dh = t / S.k, dw = t % S.k;
        W acc[IB][OB];
        for (int i = 0; i < IB; ++i)
            for (int o = 0; o < OB; ++o) acc[i][o] = W{};
        // output columns whose input column is inside the image
        long lo = 0, hi_w = S.Wo;
        while (lo < hi_w && lo * S.s + dw - S.pad() < 0) ++lo;
        while (hi_w > lo && (hi_w - 1) * S.s + dw - S.pad() >= S.W) --hi_w;
        // pointers stepped per position: index arithmetic (multiplies) per load would compete with the FMAs
        const long K = S.K, gstep = S.Co * K, xstep = S.s * S.Ci * K;
        for (long ho = 0; ho < S.Ho; ++ho) {
            const long hi = ho * S.s + dh - S.pad();
            if (hi < 0 || hi >= S.H) continue;
            const T* gp = g + S.out_at(b, ho, lo, o0) + m;
            const T* xp = x + S.x_at(b, hi, lo * S.s + dw - S.pad(), i0) + m;
            for (long wo = lo; wo < hi_w; ++wo, gp += gstep, xp += xstep) {
                W gv[OB];
                for (int o = 0; o < OB; ++o) gv[o] = load<W>(gp + o * K);
                for (int i = 0; i < IB; ++i) {
                    const W xv = load<W>(xp + i * K);
                    for (int o = 0; o < OB; ++o) acc[i][o] += xv * gv[o];
                }
            }
        }
        for (int i = 0; i < IB; ++i)
            for (int o = 0; o < OB; ++o) {
                T* p = gw + S.w_at(t, i0 + i, o0 + o) + m;
                store(p, load<W>(p) + acc[i][o]);
            }
    }
};

// With one input channel (the first block) a tile of input channels holds a single one, and each output
// position then costs OB + 1 loads for OB multiply-adds. Instead DB neighbouring taps of one kernel row
// share a tile: DB x OB accumulators, OB + DB loads per position. Each accumulator sums the same products
// in the same (row-major) order as a one-tap tile, so both tilings give the same bits.
template <typename T, typename W, int DB>
struct BackwardWeightRowTile {
    const Shape& S; const T* x; const T* g; T* gw; long b, dh, dw0, o0, m;
    template <int OB> void run() {
        W acc[DB][OB];
        for (int d = 0; d < DB; ++d)
            for (int o = 0; o < OB; ++o) acc[d][o] = W{};
        // output columns whose every tap of the block reads inside the image: [lo, hi)
        long lo = 0, hi = S.Wo;
        while (lo < hi && lo * S.s + dw0 - S.pad() < 0) ++lo;
        while (hi > lo && (hi - 1) * S.s + dw0 + DB - 1 - S.pad() >= S.W) --hi;
        const long K = S.K, gstep = S.Co * K;   // one input channel: an input column is K values
        for (long ho = 0; ho < S.Ho; ++ho) {
            const long hr = ho * S.s + dh - S.pad();
            if (hr < 0 || hr >= S.H) continue;
            const T* grow = g + S.out_at(b, ho, 0, o0) + m;
            const T* xrow = x + S.x_at(b, hr, 0, 0) + m;
            for (long wo = 0; wo < S.Wo; ++wo) {
                W gv[OB];
                for (int o = 0; o < OB; ++o) { gv[o] = load<W>(grow + wo * gstep + o * K); in_register(gv[o]); }
                const long wi0 = wo * S.s + dw0 - S.pad();
                if (wo >= lo && wo < hi) {
                    const T* xp = xrow + wi0 * K;
                    for (int d = 0; d < DB; ++d) {
                        const W xv = load<W>(xp + d * K);
                        for (int o = 0; o < OB; ++o) acc[d][o] += xv * gv[o];
                    }
                    continue;
                }
                for (int d = 0; d < DB; ++d) {
                    if (wi0 + d < 0 || wi0 + d >= S.W) continue;
                    const W xv = load<W>(xrow + (wi0 + d) * K);
                    for (int o = 0; o < OB; ++o) acc[d][o] += xv * gv[o];
                }
            }
        }
        for (int d = 0; d < DB; ++d)
            for (int o = 0; o < OB; ++o) {
                T* p = gw + S.w_at(dh * S.k + dw0 + d, 0, o0 + o) + m;
                store(p, load<W>(p) + acc[d][o]);
            }
    }
};

template <typename T, typename W>
struct BackwardWeight {
    const Shape& S; const T* x; const T* g; T* gw; long b, t, i0, m;
    template <int IB> void run() {
        for (long o0 = 0; o0 < S.Co; o0 += KT_OB)
            with_block(S.Co - o0, BackwardWeightTile<T, W, IB>{S, x, g, gw, b, t, i0, o0, m});
    }
};

template <typename T>
struct BackwardDataAll {
    const Shape& S; const T* g; const T* wv; T* gx;
    template <typename W> void run(long b, long m) {
        for (long o0 = 0; o0 < S.Co; o0 += KT_OB) with_block(S.Co - o0, BackwardData<T, W>{S, g, wv, gx, b, o0, m});
    }
};

template <typename T>
struct BackwardWeightAll {
    const Shape& S; const T* x; const T* g; T* gw;
    template <typename W> void run(long b, long m) {
        if (S.Ci == 1) {
            for (long dh = 0; dh < S.k; ++dh)
                for (long dw0 = 0; dw0 < S.k; dw0 += 3)
                    for (long o0 = 0; o0 < S.Co; o0 += KT_OB) {
                        const long n = std::min<long>(3, S.k - dw0);
                        if (n == 3) with_block(S.Co - o0, BackwardWeightRowTile<T, W, 3>{S, x, g, gw, b, dh, dw0, o0, m});
                        else if (n == 2) with_block(S.Co - o0, BackwardWeightRowTile<T, W, 2>{S, x, g, gw, b, dh, dw0, o0, m});
                        else with_block(S.Co - o0, BackwardWeightRowTile<T, W, 1>{S, x, g, gw, b, dh, dw0, o0, m});
                    }
            return;
        }
        for (long t = 0; t < S.k * S.k; ++t)
            for (long i0 = 0; i0 < S.Ci; i0 += KT_IB) {
                const long n = std::min<long>(KT_IB, S.Ci - i0);
                if (n == 3) BackwardWeight<T, W>{S, x, g, gw, b, t, i0, m}.template run<3>();
                else if (n == 2) BackwardWeight<T, W>{S, x, g, gw, b, t, i0, m}.template run<2>();
                else BackwardWeight<T, W>{S, x, g, gw, b, t, i0, m}.template run<1>();
            }
    }
};

// ---- the first block's convolution fused with its max-pooling: the full-resolution output of one
// image lives in a cache-sized buffer only, never in memory as a whole batch.
struct Pool {
    long k, s, p, Hp, Wp;
};

// Max over each window and the argmax as a position h * Wo + w of the conv output, stored in T (exact
// for any image size here): the first maximum of a row-major scan wins, as in torch's max_pool2d. Done
// separably: each conv row's leftmost maximum per window (into `rows`), then the topmost of a window's
// rows, which is that same element; the windows' bounds are clipped once, not tested per element.
// Without ARG (no gradient wanted) the maxima alone.
template <typename T, typename W, bool ARG>
inline void max_pool_lanes(const Shape& S, const Pool& P, const T* buf, T* out, T* arg, long b, long m, T* rows,
                           const T* shift) {
    const long K = S.K, L = sizeof(W) / sizeof(T), C = S.Co, half = S.Ho * P.Wp * C * L;
    for (long h = 0; h < S.Ho; ++h)
        for (long pw = 0; pw < P.Wp; ++pw) {
            const long j0 = std::max(0L, pw * P.s - P.p), j1 = std::min(S.Wo, pw * P.s - P.p + P.k);
            const T* col = buf + (h * S.Wo + j0) * C * K + m;         // channel 0 of the window's first column
            T* best_at = rows + (h * P.Wp + pw) * C * L;
            for (long o = 0; o < C; ++o) {
                W best = load<W>(col + o * K), where = W{} + T(h * S.Wo + j0);
                for (long j = 1; j < j1 - j0; ++j) {
                    const W v = load<W>(col + (j * C + o) * K);
                    const auto up = v > best;
                    best = up ? v : best;
                    if (ARG) where = up ? W{} + T(h * S.Wo + j0 + j) : where;
                }
                store(best_at + o * L, best);
                if (ARG) store(best_at + half + o * L, where);
            }
        }
    const long row = P.Wp * C * L;   // one conv row's maxima in `rows`
    for (long ph = 0; ph < P.Hp; ++ph) {
        const long i0 = std::max(0L, ph * P.s - P.p), i1 = std::min(S.Ho, ph * P.s - P.p + P.k);
        T* o_at = out + ((b * P.Hp + ph) * P.Wp * C) * K + m;
        T* a_at = ARG ? arg + ((b * P.Hp + ph) * P.Wp * C) * K + m : nullptr;
        for (long q = 0; q < P.Wp * C; ++q) {                      // (pw, o) pairs, consecutive in both
            const T* first = rows + i0 * row + q * L;
            W best = load<W>(first), where = ARG ? load<W>(first + half) : W{};
            for (long i = 1; i < i1 - i0; ++i) {
                const W v = load<W>(first + i * row);
                const auto up = v > best;
                best = up ? v : best;
                if (ARG) where = up ? load<W>(first + i * row + half) : where;
            }
            if (shift) {   // relu(max + shift): the first block's folded BN shift and its ReLU
                best += load<W>(shift + q % C * K + m);
                best = best > W{} ? best : W{};
            }
            store(o_at + q * K, best);
            if (ARG) store(a_at + q * K, where);
        }
    }
}

template <typename T>
struct PoolAll {
    const Shape& S; const Pool& P; const T* buf; T* out; T* arg; long b; T* rows; const T* shift;
    template <typename W> void run(long, long m) {
        if (arg) max_pool_lanes<T, W, true>(S, P, buf, out, arg, b, m, rows, shift);
        else max_pool_lanes<T, W, false>(S, P, buf, out, arg, b, m, rows, shift);
    }
};

template <typename T>
void conv_pool_forward(const Shape& S, const Pool& P, const T* x, const T* wv, T* out, T* arg, const T* shift) {
    Shape one = S;
    one.B = 1;
    Padded<T> padded(S);
    Buffer<T> buf(S.Ho * S.Wo * S.Co * S.K);
    Buffer<T> rows(2 * S.Ho * P.Wp * S.Co * KT_VBYTES / sizeof(T));   // a lane chunk's row maxima and argmaxes
    for (long b = 0; b < S.B; ++b) {
        forward_image<T>(S, padded.image(x, b), wv, buf.data(), nullptr);
        each_image_and_lanes<T>(one, PoolAll<T>{one, P, buf.data(), out, arg, b, rows.data(), shift});
    }
}

// The pooled gradient back at full resolution, one image (Ho, Wo, Co, K) in `buf`: each position sums the
// gradients of the windows whose argmax it is, reading the (at most k x k) windows that hold it in scan
// order, which is the order a scatter in scan order adds them in. With `out` (the pooled output of
// relu(max-pool + shift)) the gradient is first masked where the output is 0, as the ReLU's backward
// does, and summed per channel into `gshift` (per image first, then into the running sum).
template <typename T>
struct PoolRoute {
    const Shape& S; const Pool& P; const T* g; const T* arg; const T* out; T* gm; T* buf; T* gshift; T* sums;
    // the windows that hold position i along one axis: [first, last] of n
    void windows(long i, long n, long& first, long& last) const {
        first = std::max(0L, (i + P.p - P.k + P.s) / P.s);   // ceil((i + p - k + 1) / s); i + p >= 0
        last = std::min(n - 1, (i + P.p) / P.s);
    }
    template <typename W> void run(long, long m) {
        const long K = S.K, L = sizeof(W) / sizeof(T), C = S.Co, n = P.Hp * P.Wp * C;
        if (out)   // per channel, this image's masked gradient
            for (long o = 0; o < C; ++o) store(sums + o * L, W{});
        for (long q = 0; q < n; ++q) {
            W v = load<W>(g + q * K + m);
            if (out) {
                v = load<W>(out + q * K + m) <= W{} ? W{} : v;
                store(sums + q % C * L, load<W>(sums + q % C * L) + v);
            }
            store(gm + q * L, v);
        }
        if (out)
            for (long o = 0; o < C; ++o) store(gshift + o * K + m, load<W>(gshift + o * K + m) + load<W>(sums + o * L));
        for (long o0 = 0; o0 < C; o0 += KT_OB)
            with_block(C - o0, Gather<W>{*this, m, o0});
    }
    // Positions x OB channels from o0, OB sums in registers per position.
    template <typename W>
    struct Gather {
        const PoolRoute& R; long m, o0;
        template <int OB> void run() {
            const Shape& S = R.S; const Pool& P = R.P;
            const long K = S.K, L = sizeof(W) / sizeof(T), C = S.Co;
            for (long h = 0; h < S.Ho; ++h) {
                long h0, h1;
                R.windows(h, P.Hp, h0, h1);
                for (long w = 0; w < S.Wo; ++w) {
                    long w0, w1;
                    R.windows(w, P.Wp, w0, w1);
                    const W at = W{} + T(h * S.Wo + w);
                    W acc[OB];   // from +0, adding +0 where a window's argmax is elsewhere: the scatter's bits
                    for (int o = 0; o < OB; ++o) acc[o] = W{};
                    for (long ph = h0; ph <= h1; ++ph)
                        for (long pw = w0; pw <= w1; ++pw) {
                            const long q = (ph * P.Wp + pw) * C + o0;
                            const T* a = R.arg + q * K + m;
                            const T* v = R.gm + q * L;
                            for (int o = 0; o < OB; ++o) acc[o] += load<W>(a + o * K) == at ? load<W>(v + o * L) : W{};
                        }
                    T* dst = R.buf + ((h * S.Wo + w) * C + o0) * K + m;
                    for (int o = 0; o < OB; ++o) store(dst + o * K, acc[o]);
                }
            }
        }
    };
};

// Weights' gradient (and with `out` the shift's, into gw + k*k*Ci*Co*K): the pooled gradient routed
// back to full resolution (one image at a time, in a buffer), then the convolution's own weight gradient.
template <typename T>
void conv_pool_backward_weight(const Shape& S, const Pool& P, const T* x, const T* g, const T* arg, const T* out,
                               T* gw) {
    Shape one = S;
    one.B = 1;
    const long per_pool = P.Hp * P.Wp * S.Co * S.K;
    Buffer<T> buf(S.Ho * S.Wo * S.Co * S.K), gm(per_pool), sums(S.Co * KT_VBYTES / sizeof(T));
    T* gshift = gw + S.k * S.k * S.Ci * S.Co * S.K;
    for (long b = 0; b < S.B; ++b) {
        const T* ob = out ? out + b * per_pool : nullptr;
        each_image_and_lanes<T>(one, PoolRoute<T>{one, P, g + b * per_pool, arg + b * per_pool, ob, gm.data(),
                                                  buf.data(), gshift, sums.data()});
        each_image_and_lanes<T>(one, BackwardWeightAll<T>{one, x + S.x_at(b, 0, 0, 0), buf.data(), gw});
    }
}

// The batch in `threads` contiguous parts, part t on thread t of the OpenMP team, which is PyTorch's own
// (the library links the libgomp that torch already loaded): its idle threads take the work at once,
// where a second pool of threads would compete with them for the cores. Without OpenMP the parts run
// one after another, with the same results.
template <typename F>
void split_batch(long B, long threads, F&& part) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
#endif
    for (long t = 0; t < threads; ++t) part(B * t / threads, B * (t + 1) / threads, t);
}

// Parts that all add into `sum` (a weight gradient): part 0 into `sum`, the others into zeroed copies,
// added to it in order after.
template <typename T, typename F>
void split_summed(long B, long threads, T* sum, long n, F&& part) {
    Buffer<T> extra((threads - 1) * n);
    split_batch(B, threads, [&](long b0, long b1, long t) { part(b0, b1, t == 0 ? sum : extra.data() + (t - 1) * n); });
    for (long t = 1; t < threads; ++t)
        for (long i = 0; i < n; ++i) sum[i] += extra[(t - 1) * n + i];
}

inline Shape part_of(Shape S, long b0, long b1) { S.B = b1 - b0; return S; }

// Bank entries in a member-interleaved network's layout, in one pass (the task loss's input features,
// and generation's batches of images):
//   out[n][p][c][m] = f(bank[rows[n * rows_step + m]][pick[n]][c][p] * scale[m][c] + shift[m][c])
// bank (R, Bk, C, HW), out (N, HW, C, K), scale and shift (K, C) or null (1 and 0), f: ReLU or identity;
// rows_step 0 (a row per member) or K (a row per image and member).
template <typename T>
void gather_members(const T* bank, long Bk, long C, long HW, const long* rows, long rows_step, long K,
                    const long* pick, const T* scale, const T* shift, bool relu, T* out, long n0, long n1) {
    std::vector<const T*> src(K);
    for (long n = n0; n < n1; ++n) {
        T* o = out + n * HW * C * K;
        if (rows_step && !scale && !shift && !relu) {
            // A batch of images (a row per member and entry): members innermost, as in the output, so
            // stores are consecutive; a member's run of a bank entry below stores one value per cache line.
            for (long m = 0; m < K; ++m) src[m] = bank + (rows[n * rows_step + m] * Bk + pick[n]) * C * HW;
            for (long c = 0; c < C; ++c)
                for (long p = 0; p < HW; ++p) {
                    T* d = o + (p * C + c) * K;
                    for (long m = 0; m < K; ++m) d[m] = src[m][c * HW + p];
                }
            continue;
        }
        for (long m = 0; m < K; ++m) {
            const T* src = bank + (rows[n * rows_step + m] * Bk + pick[n]) * C * HW;
            for (long c = 0; c < C; ++c) {
                const T a = scale ? scale[m * C + c] : T(1), b = shift ? shift[m * C + c] : T(0);
                const T* s = src + c * HW;
                T* d = o + c * K + m;
                if (relu)
                    for (long p = 0; p < HW; ++p) d[p * C * K] = std::max(s[p] * a + b, T(0));
                else
                    for (long p = 0; p < HW; ++p) d[p * C * K] = s[p] * a + b;
            }
        }
    }
}


// Training-mode BatchNorm + ReLU over a channels-last tensor of N positions x C channels, in two passes
// each way where BN, ReLU and their backward passes take seven: the statistics' sums in one pass
// (double accumulators), then the affine map and ReLU in one; backward, the sums over the ReLU-masked
// gradient in one pass, then the input gradient (an affine map of g and z per channel) in one.
template <typename T>
void bn_sums(const T* __restrict z, const T* __restrict g, const T* __restrict scale, const T* __restrict shift,
             long n0, long n1, long C, double* __restrict s1, double* __restrict s2) {
    for (long n = n0; n < n1; ++n) {
        const T* zr = z + n * C;
        if (g == nullptr) {   // forward: sum z, sum z^2
            for (long c = 0; c < C; ++c) { const double v = zr[c]; s1[c] += v; s2[c] += v * v; }
        } else {              // backward: sum gm, sum gm * z, gm = g where the output is positive
            const T* gr = g + n * C;
            for (long c = 0; c < C; ++c) {   // restrict pointers and the mask as a factor: vectorised
                const T gm = gr[c] * T(zr[c] * scale[c] + shift[c] > T(0));
                s1[c] += double(gm); s2[c] += double(gm) * double(zr[c]);
            }
        }
    }
}

// forward (g null): out = max(z * a + b, 0); backward: out = [z * scale + shift > 0] g * a + z * b + c
template <typename T>
void bn_apply(const T* __restrict z, const T* __restrict g, const T* __restrict scale, const T* __restrict shift,
              const T* __restrict a, const T* __restrict b, const T* __restrict c, long n0, long n1, long C,
              T* __restrict out) {
    for (long n = n0; n < n1; ++n) {
        const T* zr = z + n * C;
        T* o = out + n * C;
        if (g == nullptr) {
            for (long j = 0; j < C; ++j) o[j] = std::max(zr[j] * a[j] + b[j], T(0));
        } else {
            const T* gr = g + n * C;
            for (long j = 0; j < C; ++j) {
                const T gm = gr[j] * T(zr[j] * scale[j] + shift[j] > T(0));
                o[j] = gm * a[j] + zr[j] * b[j] + c[j];
            }
        }
    }
}

// The gradient of ReLU with a leak below zero: g where z > 0, slope * g where z < 0, 0 where z == 0.
template <typename T>
void leaky_grad(const T* __restrict z, const T* __restrict g, T slope, T* __restrict out, long n0, long n1) {
    for (long i = n0; i < n1; ++i) out[i] = z[i] > T(0) ? g[i] : z[i] < T(0) ? g[i] * slope : T(0);
}

}  // namespace

// Dropout's mask: out[i] = scale where a hash of (seed, i) falls below `keep` (out of 2^24), else 0.
// A counter-based hash, so any split of the elements over threads gives the same mask; 32-bit
// arithmetic, so the loop runs in SIMD lanes (PyTorch's CPU bernoulli_ draws each element in turn).
extern "C" void kt_dropout_mask_f32(float* out, long n, long keep, float scale, unsigned long seed, long threads) {
    const unsigned lo = (unsigned)seed, hi = (unsigned)(seed >> 32);
    split_batch(n, threads, [&](long i0, long i1, long) {
        for (long i = i0; i < i1; ++i) {
            unsigned h = (unsigned)i * 0x9E3779B1u + lo;
            h ^= (unsigned)(i >> 32) * 0x85EBCA77u ^ hi;
            h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
            h += hi;
            h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
            out[i] = (long)(h >> 8) < keep ? scale : 0.0f;
        }
    });
}

extern "C" int kt_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Every function takes the batch's shape, then `threads`; per image, x holds H*W*Ci*K values and
// out/g Ho*Wo*Co*K (pooled: Hp*Wp*Co*K).
#define KT_SHAPE_ARGS long B, long H, long W, long Ci, long Co, long K, long k, long s, long Ho, long Wo
#define KT_SHAPE Shape{B, H, W, Ci, Co, K, k, s, Ho, Wo}
#define KT_EXPORT(T, suffix)                                                                              \
    extern "C" void kt_conv_forward_##suffix(const T* x, const T* wv, T* out, KT_SHAPE_ARGS, long threads) { \
        const Shape S = KT_SHAPE;                                                                         \
        split_batch(B, threads, [&](long b0, long b1, long) {                                             \
            const Shape P = part_of(S, b0, b1);                                                           \
            forward_all<T>(P, x + S.x_at(b0, 0, 0, 0), wv, out + S.out_at(b0, 0, 0, 0));                  \
        });                                                                                               \
    }                                                                                                     \
    /* the forward pass with an epilogue: out = relu(conv + shift), shift interleaved (Co, K) */          \
    extern "C" void kt_conv_forward_ep_##suffix(const T* x, const T* wv, const T* shift, T* out, KT_SHAPE_ARGS, \
                                                long threads) {                                            \
        const Shape S = KT_SHAPE;                                                                         \
        split_batch(B, threads, [&](long b0, long b1, long) {                                             \
            const Shape P = part_of(S, b0, b1);                                                           \
            forward_all<T>(P, x + S.x_at(b0, 0, 0, 0), wv, out + S.out_at(b0, 0, 0, 0), shift);           \
        });                                                                                               \
    }                                                                                                     \
    /* gx must hold zeros (or what the gradient adds to) */                                               \
    extern "C" void kt_conv_backward_data_##suffix(const T* g, const T* wv, T* gx, KT_SHAPE_ARGS, long threads) { \
        const Shape S = KT_SHAPE;                                                                         \
        split_batch(B, threads, [&](long b0, long b1, long) {                                             \
            const Shape P = part_of(S, b0, b1);                                                           \
            each_image_and_lanes<T>(P, BackwardDataAll<T>{P, g + S.out_at(b0, 0, 0, 0), wv, gx + S.x_at(b0, 0, 0, 0)}); \
        });                                                                                               \
    }                                                                                                     \
    /* gw must hold zeros (or what the gradient adds to) */                                               \
    extern "C" void kt_conv_backward_weight_##suffix(const T* x, const T* g, T* gw, KT_SHAPE_ARGS, long threads) { \
        const Shape S = KT_SHAPE;                                                                         \
        split_summed(B, threads, gw, k * k * Ci * Co * K, [&](long b0, long b1, T* into) {                \
            const Shape P = part_of(S, b0, b1);                                                           \
            each_image_and_lanes<T>(P, BackwardWeightAll<T>{P, x + S.x_at(b0, 0, 0, 0), g + S.out_at(b0, 0, 0, 0), into}); \
        });                                                                                               \
    }                                                                                                     \
    /* out = relu(max-pool(conv) + shift) with shift interleaved (Co, K), or the max-pool alone (null) */ \
    extern "C" void kt_conv_pool_forward_ep_##suffix(const T* x, const T* wv, const T* shift, T* out, T* arg, \
                                                     KT_SHAPE_ARGS, long pk, long ps, long pp, long Hp, long Wp, \
                                                     long threads) {                                     \
        const Shape S = KT_SHAPE;                                                                         \
        const long per = Hp * Wp * Co * K;                                                                \
        split_batch(B, threads, [&](long b0, long b1, long) {                                             \
            conv_pool_forward<T>(part_of(S, b0, b1), Pool{pk, ps, pp, Hp, Wp}, x + S.x_at(b0, 0, 0, 0),   \
                                 wv, out + b0 * per, arg ? arg + b0 * per : nullptr, shift);          \
        });                                                                                               \
    }                                                                                                     \
    /* conv then max-pool (pool k, s, p; pooled size Hp x Wp); arg: argmax positions for backward, or null */ \
    extern "C" void kt_conv_pool_forward_##suffix(const T* x, const T* wv, T* out, T* arg, KT_SHAPE_ARGS, \
                                                  long pk, long ps, long pp, long Hp, long Wp, long threads) { \
        kt_conv_pool_forward_ep_##suffix(x, wv, nullptr, out, arg, B, H, W, Ci, Co, K, k, s, Ho, Wo, pk, ps, pp, \
                                         Hp, Wp, threads);                                                \
    }                                                                                                     \
    /* gw must hold zeros (or what the gradient adds to); with out (relu(max-pool + shift)'s output), gw  \
       holds k*k*Ci*Co*K weight gradients, then Co*K of the shift */                                     \
    extern "C" void kt_conv_pool_backward_weight_##suffix(const T* x, const T* g, const T* arg, const T* out, \
                                                          T* gw, KT_SHAPE_ARGS, long pk, long ps, long pp, \
                                                          long Hp, long Wp, long threads) {               \
        const Shape S = KT_SHAPE;                                                                         \
        const long per = Hp * Wp * Co * K;                                                                \
        split_summed(B, threads, gw, (k * k * Ci + (out ? 1 : 0)) * Co * K, [&](long b0, long b1, T* into) { \
            conv_pool_backward_weight<T>(part_of(S, b0, b1), Pool{pk, ps, pp, Hp, Wp}, x + S.x_at(b0, 0, 0, 0), \
                                         g + b0 * per, arg + b0 * per, out ? out + b0 * per : nullptr, into); \
        });                                                                                               \
    }

KT_EXPORT(float, f32)
KT_EXPORT(double, f64)

// Entries (rows[m], pick[n]) of a per-pair bank (R, Bk, C, HW) as a K-member interleaved input
// (N, HW, C, K), each scaled and shifted per member and channel (scale, shift (K, C) or null) and
// optionally ReLU'd, in one pass; parts of the N images on the threads.
#define KT_GATHER(T, suffix)                                                                              \
    extern "C" void kt_gather_members_##suffix(const T* bank, const long* rows, const long* pick,         \
                                               const T* scale, const T* shift, T* out, long Bk, long C,    \
                                               long HW, long K, long N, long rows_step, long relu,         \
                                               long threads) {                                             \
        split_batch(N, threads, [&](long n0, long n1, long) {                                             \
            gather_members<T>(bank, Bk, C, HW, rows, rows_step, K, pick, scale, shift, relu != 0, out, n0, n1); \
        });                                                                                               \
    }
KT_GATHER(float, f32)
KT_GATHER(double, f64)

// BatchNorm + ReLU (see bn_sums / bn_apply): the sums into s1, s2 (C doubles each, zeroed here), split
// over the positions on the threads (each part into its own zeroed copy, added in order after).
#define KT_BN(T, suffix)                                                                                  \
    extern "C" void kt_bn_sums_##suffix(const T* z, const T* g, const T* scale, const T* shift, double* s1, \
                                        double* s2, long N, long C, long threads) {                        \
        double* part = new double[2 * C * threads]();                                                     \
        split_batch(N, threads, [&](long n0, long n1, long t) {                                           \
            bn_sums<T>(z, g, scale, shift, n0, n1, C, part + 2 * C * t, part + 2 * C * t + C);             \
        });                                                                                               \
        for (long j = 0; j < C; ++j) { s1[j] = 0; s2[j] = 0; }                                            \
        for (long t = 0; t < threads; ++t)                                                                \
            for (long j = 0; j < C; ++j) { s1[j] += part[2 * C * t + j]; s2[j] += part[2 * C * t + C + j]; } \
        delete[] part;                                                                                    \
    }                                                                                                     \
    extern "C" void kt_bn_apply_##suffix(const T* z, const T* g, const T* scale, const T* shift, const T* a, \
                                         const T* b, const T* c, T* out, long N, long C, long threads) {  \
        split_batch(N, threads, [&](long n0, long n1, long) {                                             \
            bn_apply<T>(z, g, scale, shift, a, b, c, n0, n1, C, out);                                     \
        });                                                                                               \
    }
KT_BN(float, f32)
KT_BN(double, f64)

// relu_leaky_grad's backward (see leaky_grad) over n elements of z and g in the same layout.
#define KT_LEAKY(T, suffix)                                                                               \
    extern "C" void kt_leaky_grad_##suffix(const T* z, const T* g, double slope, T* out, long n, long threads) { \
        split_batch(n, threads, [&](long i0, long i1, long) { leaky_grad<T>(z, g, T(slope), out, i0, i1); }); \
    }
KT_LEAKY(float, f32)
KT_LEAKY(double, f64)
