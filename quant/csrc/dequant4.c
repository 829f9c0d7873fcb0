/* Blockwise 4-bit dequantization in one pass: out[i] = round(code[q[i]] * absmax[i / bs]).
 *
 * The native twin of quant/blockwise.py's `dequantize_4bit` (the PyTorch reference it is
 * tested against, bit for bit). Per block of `bs` elements the 16 levels are scaled once
 * in float32 (code[j] * absmax, the same product bitsandbytes computes), then each byte of
 * packed codes picks two of them: element 2i from the high nibble, 2i + 1 from the low.
 * The float32 value is rounded once to the output type (round to nearest, ties to even).
 *
 * Two versions of the loop: AVX-512 (a 16-entry table lookup is one vpermps) where the CPU
 * has it, else portable C. Threads come from OpenMP: loaded into a process that runs
 * PyTorch, libgomp.so.1 is PyTorch's own, so the blocks are split among the same, already
 * running threads that PyTorch's ops use (as bitsandbytes' CPU library does).
 * Built at first use by quant/native.py with the system C compiler; no Python headers.
 *
 * Every call carries the length of each buffer, and `loralab_dequant4` checks them all
 * before reading or writing anything: a tampered state that slipped past the Python checks
 * gets an error code back, never an out-of-bounds access.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

/* The absmax of each block: plain float32, or double-quantized (QLoRA sec. 3) as 8-bit
 * codes into `code8` with one float32 scale per `nested_bs` blocks and a float32 offset. */
typedef struct {
    const float *absmax;   /* (nblocks,) float32, or NULL when double-quantized */
    const uint8_t *q;      /* (nblocks,) uint8 codes into code8 */
    const float *code8;    /* (256,) float32 */
    const float *nested;   /* (ceil(nblocks / nested_bs),) float32 */
    float offset;
    int64_t nested_bs;
} scales_t;

/* bitsandbytes' order of operations: code8[q] * nested in float32, then + offset. */
static inline float block_scale(const scales_t *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    const float a = s->code8[s->q[b]] * s->nested[b / s->nested_bs];
    return a + s->offset;
}

static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16 bits, round to nearest, ties to even (torch's c10::BFloat16; the
 * inputs are finite products, so the NaN case of torch's conversion never arises). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = f32_to_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> IEEE half bits, round to nearest even, subnormals kept: the FP16 library's
 * fp16_ieee_from_fp32_value, which torch's c10::Half uses (so the bits are torch's). */
static inline uint16_t f16_bits(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;  /* overflow to inf, then rescale */
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;  /* the addition rounds */
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static void dequant_portable(const uint8_t *packed, const scales_t *sc, const float *code,
                             void *out, int64_t b0, int64_t b1, int64_t bs, int kind) {
    const int64_t half = bs / 2;  /* bytes per block */
    for (int64_t b = b0; b < b1; ++b) {
        const uint8_t *p = packed + b * half;
        const float scale = block_scale(sc, b);
        float tab[16];
        for (int j = 0; j < 16; ++j) tab[j] = code[j] * scale;  /* float32 product */
        if (kind == OUT_F32) {
            float *o = (float *)out + b * bs;
            for (int64_t i = 0; i < half; ++i) {
                o[2 * i] = tab[p[i] >> 4];
                o[2 * i + 1] = tab[p[i] & 15];
            }
        } else {
            uint16_t t16[16];
            for (int j = 0; j < 16; ++j) t16[j] = kind == OUT_BF16 ? bf16_bits(tab[j]) : f16_bits(tab[j]);
            uint16_t *o = (uint16_t *)out + b * bs;
            for (int64_t i = 0; i < half; ++i) {
                o[2 * i] = t16[p[i] >> 4];
                o[2 * i + 1] = t16[p[i] & 15];
            }
        }
    }
}

#ifdef HAVE_X86
/* 16 packed bytes -> the 32 nibble indices in element order, as two (16,) int32 vectors. */
__attribute__((target("avx512f,avx512bw")))
static inline void nibble_indices(const uint8_t *p, __m512i *first, __m512i *second) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i lo = _mm_and_si128(bytes, mask);
    *first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  /* hi0 lo0 hi1 lo1 ... (bytes 0-7) */
    *second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)); /* bytes 8-15 */
}

/* (16,) float32 -> (16,) bfloat16 bits, the same rounding as bf16_bits. */
__attribute__((target("avx512f,avx512bw")))
static inline __m256i bf16_vec(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

__attribute__((target("avx512f,avx512bw,f16c")))
static void dequant_avx512(const uint8_t *packed, const scales_t *sc, const float *code,
                           void *out, int64_t b0, int64_t b1, int64_t bs, int kind) {
    const int64_t half = bs / 2;  /* bytes per block, a multiple of 16 (bs >= 32) */
    const __m512 levels = _mm512_loadu_ps(code);
    for (int64_t b = b0; b < b1; ++b) {
        const __m512 tab = _mm512_mul_ps(levels, _mm512_set1_ps(block_scale(sc, b)));  /* float32 products */
        const uint8_t *p = packed + b * half;
        for (int64_t i = 0; i < half; i += 16) {
            __m512i i0, i1;
            nibble_indices(p + i, &i0, &i1);
            const __m512 v0 = _mm512_permutexvar_ps(i0, tab);  /* elements 2i .. 2i + 15 */
            const __m512 v1 = _mm512_permutexvar_ps(i1, tab);  /* elements 2i + 16 .. 2i + 31 */
            const int64_t e = b * bs + 2 * i;
            if (kind == OUT_F32) {
                _mm512_storeu_ps((float *)out + e, v0);
                _mm512_storeu_ps((float *)out + e + 16, v1);
            } else if (kind == OUT_BF16) {
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + e), bf16_vec(v0));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + e + 16), bf16_vec(v1));
            } else {
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + e),
                                    _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + e + 16),
                                    _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
    }
}
#endif

/* 1 when the AVX-512 loop runs on this CPU, else 0 (the portable loop). */
int loralab_dequant4_simd(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static void dequant_range(const uint8_t *packed, const scales_t *sc, const float *code, void *out,
                          int64_t b0, int64_t b1, int64_t bs, int kind, int simd) {
#ifdef HAVE_X86
    if (simd && bs % 32 == 0) {
        dequant_avx512(packed, sc, code, out, b0, b1, bs, kind);
        return;
    }
#endif
    (void)simd;
    dequant_portable(packed, sc, code, out, b0, b1, bs, kind);
}

/* One call's arguments; quant/native.py mirrors this struct with ctypes. Lengths count
 * elements of the pointed-to type. */
typedef struct {
    const uint8_t *packed;   /* bs / 2 bytes per block, from block 0 */
    int64_t packed_len;
    const float *absmax;     /* float32 per block, or NULL: double quantization, below */
    const uint8_t *qabsmax;  /* uint8 per block, codes into code8 */
    int64_t absmax_len;      /* length of absmax or qabsmax, whichever is used */
    const float *code8;      /* 256 float32 */
    const float *nested;     /* float32 per nested_bs blocks */
    int64_t nested_len;
    int64_t nested_bs;
    float offset;
    const float *code;       /* the 16 float32 levels */
    void *out;               /* from element 0: float32 (kind 0), bfloat16 (1) or float16 (2) */
    int64_t out_len;
    int64_t b0, b1;          /* the blocks to write: [b0, b1) */
    int64_t bs;              /* elements per block: even, >= 32 */
    int32_t kind;
    int32_t simd;            /* 1: the AVX-512 loop (only when loralab_dequant4_simd() says so) */
    int32_t nthreads;        /* OpenMP threads, each taking one contiguous run of blocks */
} loralab_dequant4_args;

/* Error codes of loralab_dequant4 (0: done). quant/native.py turns them into messages. */
enum {
    ERR_BLOCKSIZE = 1, ERR_RANGE, ERR_PACKED, ERR_ABSMAX, ERR_NESTED, ERR_OUT, ERR_KIND,
    ERR_SIMD, ERR_NULL
};

/* ceil(a / b) for a >= 0, b >= 1, without overflow. */
static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

/* 0 when every buffer holds what blocks [b0, b1) need, else the first error found. */
static int check_args(const loralab_dequant4_args *a) {
    if (a->bs < 32 || a->bs % 2 || a->bs > ((int64_t)1 << 30)) return ERR_BLOCKSIZE;
    if (a->kind < OUT_F32 || a->kind > OUT_F16) return ERR_KIND;
    if (a->b0 < 0 || a->b1 < a->b0 || a->b1 > INT64_MAX / a->bs) return ERR_RANGE;
    if (a->simd && !loralab_dequant4_simd()) return ERR_SIMD;
    if (a->b1 == a->b0) return 0;  /* nothing is read or written */
    if (!a->packed || !a->code || !a->out) return ERR_NULL;
    if (a->packed_len < 0 || a->b1 * (a->bs / 2) > a->packed_len) return ERR_PACKED;
    if (a->out_len < 0 || a->b1 * a->bs > a->out_len) return ERR_OUT;
    if (a->absmax_len < 0 || a->b1 > a->absmax_len) return ERR_ABSMAX;
    if (a->absmax) return 0;
    if (!a->qabsmax || !a->code8 || !a->nested) return ERR_NULL;
    if (a->nested_bs < 1 || a->nested_len < 0 || ceil_div(a->b1, a->nested_bs) > a->nested_len)
        return ERR_NESTED;
    return 0;
}

/* Dequantize the whole blocks [a->b0, a->b1) after checking every length (see
 * loralab_dequant4_args); returns 0, or an error code without touching any buffer.
 * Blocks outside [b0, b1) are neither read nor written. */
int loralab_dequant4(const loralab_dequant4_args *a) {
    if (!a) return ERR_NULL;
    const int err = check_args(a);
    if (err) return err;
    const uint8_t *packed = a->packed;
    const float *code = a->code;
    void *out = a->out;
    const int64_t b0 = a->b0, b1 = a->b1, bs = a->bs;
    const int kind = a->kind, simd = a->simd, nthreads = a->nthreads;
    const scales_t sc = {a->absmax, a->qabsmax, a->code8, a->nested, a->offset, a->nested_bs};
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            dequant_range(packed, &sc, code, out, b0 + (b1 - b0) * t / T, b0 + (b1 - b0) * (t + 1) / T,
                          bs, kind, simd);
        }
        return 0;
    }
#endif
    (void)nthreads;
    dequant_range(packed, &sc, code, out, b0, b1, bs, kind, simd);
    return 0;
}

/* 1 when built with OpenMP (nthreads > 1 is used), else 0. */
int loralab_dequant4_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
