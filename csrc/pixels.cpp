// The workers' pixel maps with PIL's arithmetic, giving PIL's pixels bit for bit, several times faster; the Python
// side is engine/data/pixels.py, which uses PIL itself when this extension is not built.
//
// 1. Resampling (`Image.resize` of an RGB image with BILINEAR, BICUBIC or LANCZOS; Pillow's libImaging/Resample.c).
//    The same as PIL: the filter weights (double precision, the same expressions), their normalisation and rounding
//    to 22-bit fixed point, the two passes (horizontal first, only over the rows the vertical pass reads; every
//    intermediate clipped to uint8), and the 32-bit integer sums. Integer addition is associative, so the order in
//    which the taps are summed does not change a bit. Different: the memory order, which makes both passes one
//    routine. A pass computes each output line as a weighted sum of whole input lines,
//    `out[o][:] = clip(sum_k w[o][k] * in[first[o] + k][:])`, a loop over contiguous bytes (AVX2 where the CPU has it,
//    chosen at run time; portable loops otherwise). The vertical pass runs on rows as they are; the horizontal pass
//    runs on the image transposed (columns as lines) and its result is transposed back.
// 2. Affine maps (`Image.transform(size, AFFINE, ...)` with BILINEAR or BICUBIC and a fill colour; Geometry.c), for
//    RandAugment's rotate, shear and translate: PIL's per-pixel double arithmetic in PIL's order, the three channels
//    of a pixel in one AVX2 register.
// 3. Segmentation's saturation/hue distortion: its numpy float32 HSV round trip, per pixel.
// Timings per stage: `python benchmarks/bench_data.py --stages=true`.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BEIT_HAVE_AVX2 1
#else
#define BEIT_HAVE_AVX2 0
#endif

namespace py = pybind11;

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL: 8 bits of result, 2 bits of headroom for the negative lobes
constexpr int kChannels = 3;

struct Filter {
    double (*weight)(double);
    double support;
};

double bilinear_weight(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_weight(double x) {  // Keys' cubic convolution, a = -0.5, written as PIL evaluates it
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return std::sin(x) / x;
}

double lanczos_weight(double x) {  // 3-lobed Lanczos
    if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3);
    return 0.0;
}

Filter filter_named(const std::string& name) {
    if (name == "bilinear") return {bilinear_weight, 1.0};
    if (name == "bicubic") return {bicubic_weight, 2.0};
    if (name == "lanczos") return {lanczos_weight, 3.0};
    throw std::invalid_argument("filter must be 'bilinear', 'bicubic' or 'lanczos', got '" + name + "'");
}

// The input lines each output line sums, and their fixed-point weights: PIL's precompute_coeffs and
// normalize_coeffs_8bpc for the box (0, in_size).
struct Taps {
    int out_size = 0;
    int width = 0;               // weights per output line (PIL's ksize)
    std::vector<int> first;      // [out_size] first input line
    std::vector<int> count;      // [out_size] input lines summed
    std::vector<int32_t> weight; // [out_size, width]
};

Taps compute_taps(int in_size, int out_size, const Filter& filter) {
    Taps taps;
    const double scale = static_cast<double>(static_cast<float>(in_size)) / out_size;
    const double filter_scale = std::max(scale, 1.0);  // widen the filter when shrinking: antialiasing
    const double support = filter.support * filter_scale;
    taps.out_size = out_size;
    taps.width = static_cast<int>(std::ceil(support)) * 2 + 1;
    taps.first.resize(out_size);
    taps.count.resize(out_size);
    taps.weight.assign(static_cast<size_t>(out_size) * taps.width, 0);
    std::vector<double> weights(taps.width);
    for (int o = 0; o < out_size; ++o) {
        const double center = (o + 0.5) * scale;
        const double inverse_scale = 1.0 / filter_scale;
        const int first = std::max(static_cast<int>(center - support + 0.5), 0);
        const int count = std::min(static_cast<int>(center + support + 0.5), in_size) - first;
        double total = 0.0;
        for (int k = 0; k < count; ++k) {
            weights[k] = filter.weight((static_cast<double>(k + first) - center + 0.5) * inverse_scale);
            total += weights[k];
        }
        for (int k = 0; k < count; ++k) {
            const double normalised = total != 0.0 ? weights[k] / total : weights[k];
            const double fixed = normalised * (1 << kPrecisionBits);
            taps.weight[static_cast<size_t>(o) * taps.width + k] =
                static_cast<int32_t>(normalised < 0 ? -0.5 + fixed : 0.5 + fixed);
        }
        taps.first[o] = first;
        taps.count[o] = count;
    }
    return taps;
}

constexpr uint32_t kRounding = 1u << (kPrecisionBits - 1);  // makes the final shift round to nearest

// A pass: out line o (`line_bytes` long, lines `dst_pitch` apart) = clip(sum_k w[o][k] * src line (first[o] + k)),
// src lines `src_pitch` apart. Unsigned sums wrap exactly as PIL's int sums do; the shift reads them back as signed.
using ConvolveLines = void (*)(const uint8_t* src, int64_t src_pitch, int64_t line_bytes, const Taps& taps,
                               uint8_t* dst, int64_t dst_pitch);

uint8_t clip(uint32_t sum) {
    const int32_t value = static_cast<int32_t>(sum) >> kPrecisionBits;
    return static_cast<uint8_t>(value < 0 ? 0 : value > 255 ? 255 : value);
}

// Bytes [begin, end) of one output line from its `count` input lines (`src_pitch` apart, from `lines`): plain loops
// over 64-lane chunks, which compilers vectorise for the baseline instruction set.
void convolve_line_portable(const uint8_t* lines, int64_t src_pitch, const int32_t* weights, int count,
                            int64_t begin, int64_t end, uint8_t* out) {
    constexpr int64_t kChunk = 64;
    for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t n = std::min(kChunk, end - start);
        uint32_t sums[kChunk];
        for (int64_t j = 0; j < kChunk; ++j) sums[j] = kRounding;
        for (int k = 0; k < count; ++k) {
            const uint32_t weight = static_cast<uint32_t>(weights[k]);
            const uint8_t* in = lines + k * src_pitch + start;
            for (int64_t j = 0; j < n; ++j) sums[j] += weight * in[j];
        }
        for (int64_t j = 0; j < n; ++j) out[start + j] = clip(sums[j]);
    }
}

void convolve_lines_portable(const uint8_t* src, int64_t src_pitch, int64_t line_bytes, const Taps& taps,
                             uint8_t* dst, int64_t dst_pitch) {
    for (int o = 0; o < taps.out_size; ++o) {
        convolve_line_portable(src + static_cast<int64_t>(taps.first[o]) * src_pitch, src_pitch,
                               &taps.weight[static_cast<size_t>(o) * taps.width], taps.count[o], 0, line_bytes,
                               dst + static_cast<int64_t>(o) * dst_pitch);
    }
}

#if BEIT_HAVE_AVX2
// AVX2: 32 lanes at a time in four registers (u8 widened to u32, 32-bit multiply-add), packed back to u8 with
// saturation (which is the clip); the remainder of a line goes through the portable loop.
__attribute__((target("avx2"))) void convolve_lines_avx2(const uint8_t* src, int64_t src_pitch, int64_t line_bytes,
                                                         const Taps& taps, uint8_t* dst, int64_t dst_pitch) {
    constexpr int64_t kBlock = 32;
    const __m256i rounding = _mm256_set1_epi32(static_cast<int32_t>(kRounding));
    const __m256i unpermute = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the per-128-bit packs
    const int64_t blocked = line_bytes / kBlock * kBlock;
    for (int o = 0; o < taps.out_size; ++o) {
        const int32_t* weights = &taps.weight[static_cast<size_t>(o) * taps.width];
        const int count = taps.count[o];
        const uint8_t* lines = src + static_cast<int64_t>(taps.first[o]) * src_pitch;
        uint8_t* out = dst + static_cast<int64_t>(o) * dst_pitch;
        for (int64_t start = 0; start < blocked; start += kBlock) {
            __m256i s0 = rounding, s1 = rounding, s2 = rounding, s3 = rounding;
            for (int k = 0; k < count; ++k) {
                const __m256i weight = _mm256_set1_epi32(weights[k]);
                const uint8_t* in = lines + k * src_pitch + start;
#define BEIT_WIDENED(offset) _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + (offset))))
                s0 = _mm256_add_epi32(s0, _mm256_mullo_epi32(BEIT_WIDENED(0), weight));
                s1 = _mm256_add_epi32(s1, _mm256_mullo_epi32(BEIT_WIDENED(8), weight));
                s2 = _mm256_add_epi32(s2, _mm256_mullo_epi32(BEIT_WIDENED(16), weight));
                s3 = _mm256_add_epi32(s3, _mm256_mullo_epi32(BEIT_WIDENED(24), weight));
#undef BEIT_WIDENED
            }
            const __m256i low = _mm256_packus_epi32(_mm256_srai_epi32(s0, kPrecisionBits),
                                                    _mm256_srai_epi32(s1, kPrecisionBits));
            const __m256i high = _mm256_packus_epi32(_mm256_srai_epi32(s2, kPrecisionBits),
                                                     _mm256_srai_epi32(s3, kPrecisionBits));
            const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(low, high), unpermute);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + start), bytes);
        }
        convolve_line_portable(lines, src_pitch, weights, count, blocked, line_bytes, out);
    }
}
#endif

ConvolveLines pick_convolve_lines(bool simd) {
#if BEIT_HAVE_AVX2
    if (simd && __builtin_cpu_supports("avx2")) return convolve_lines_avx2;
#endif
    (void)simd;
    return convolve_lines_portable;
}

// dst[c][r] = src[r][c] for 3-byte pixels: `rows` x `cols` pixels, rows `src_pitch` bytes apart in src and `dst_pitch`
// apart in dst. Pixels move as 4-byte words where the extra byte stays inside both buffers and is overwritten by the
// next pixel of the dst row (or lands in a padding byte: `dst_pitch` > rows * 3); tiled so that the dst rows being
// written stay in cache.
void transpose_pixels(const uint8_t* src, int rows, int cols, int64_t src_pitch, uint8_t* dst, int64_t dst_pitch) {
    constexpr int kTile = 16;
    for (int r0 = 0; r0 < rows; r0 += kTile) {
        const int r1 = std::min(r0 + kTile, rows);
        for (int c0 = 0; c0 < cols; c0 += kTile) {
            const int c1 = std::min(c0 + kTile, cols);
            for (int r = r0; r < r1; ++r) {
                const uint8_t* in = src + r * src_pitch;
                uint8_t* out = dst + static_cast<int64_t>(r) * kChannels;
                const int word_end = r * kChannels + 4 <= dst_pitch ? std::min(c1, cols - 1) : c0;
                int c = c0;
                for (; c < word_end; ++c) {
                    uint32_t word;
                    std::memcpy(&word, in + c * kChannels, sizeof(word));
                    std::memcpy(out + c * dst_pitch, &word, sizeof(word));
                }
                for (; c < c1; ++c) std::memcpy(out + c * dst_pitch, in + c * kChannels, kChannels);
            }
        }
    }
}

// PIL's ImagingResampleInner for an RGB image `in_height` x `in_width` (rows `pitch` bytes apart) → packed
// `out_height` x `out_width` x 3 at `dst`.
void resample_rgb(const uint8_t* src, int in_height, int in_width, int64_t pitch, int out_height, int out_width,
                  const Filter& filter, ConvolveLines convolve_lines, uint8_t* dst) {
    const bool horizontal = out_width != in_width;
    const bool vertical = out_height != in_height;
    const int64_t out_pitch = static_cast<int64_t>(out_width) * kChannels;
    Taps rows = compute_taps(in_height, out_height, filter);
    if (!horizontal && !vertical) {
        for (int r = 0; r < in_height; ++r) std::memcpy(dst + r * out_pitch, src + r * pitch, out_pitch);
        return;
    }
    if (!horizontal) {
        convolve_lines(src, pitch, out_pitch, rows, dst, out_pitch);
        return;
    }
    // the horizontal pass covers only the rows that the vertical pass reads, as PIL's
    const int row_first = vertical ? rows.first.front() : 0;
    const int row_end = vertical ? rows.first.back() + rows.count.back() : in_height;
    const int used_rows = row_end - row_first;
    const Taps columns = compute_taps(in_width, out_width, filter);
    // the columns of the used rows, the resampled columns and the rows of those: one padding byte per line
    const int64_t column_bytes = static_cast<int64_t>(used_rows) * kChannels;
    std::vector<uint8_t> by_column(static_cast<size_t>(in_width) * (column_bytes + 1));  // [in_width, rows, 3]
    std::vector<uint8_t> resampled_columns(static_cast<size_t>(out_width) * (column_bytes + 1));  // [out_w, rows, 3]
    transpose_pixels(src + row_first * pitch, used_rows, in_width, pitch, by_column.data(), column_bytes + 1);
    convolve_lines(by_column.data(), column_bytes + 1, column_bytes, columns, resampled_columns.data(),
                   column_bytes + 1);
    if (!vertical) {
        transpose_pixels(resampled_columns.data(), out_width, used_rows, column_bytes + 1, dst, out_pitch);
        return;
    }
    std::vector<uint8_t> by_row(static_cast<size_t>(used_rows) * (out_pitch + 1));  // [rows, out_width, 3]
    transpose_pixels(resampled_columns.data(), out_width, used_rows, column_bytes + 1, by_row.data(), out_pitch + 1);
    for (int& first : rows.first) first -= row_first;
    convolve_lines(by_row.data(), out_pitch + 1, out_pitch, rows, dst, out_pitch);
}

py::array_t<uint8_t> resample(const py::array& pixels, int width, int height, const std::string& filter_name,
                              bool simd) {
    const Filter filter = filter_named(filter_name);
    if (pixels.dtype().kind() != 'u' || pixels.itemsize() != 1 || pixels.ndim() != 3 || pixels.shape(2) != 3) {
        throw std::invalid_argument("expected a uint8 [H, W, 3] array");
    }
    const int in_height = static_cast<int>(pixels.shape(0));
    const int in_width = static_cast<int>(pixels.shape(1));
    if (pixels.strides(2) != 1 || pixels.strides(1) != kChannels || pixels.strides(0) < in_width * kChannels) {
        throw std::invalid_argument("expected packed pixels (strides [pitch, 3, 1]): pass np.ascontiguousarray(...)");
    }
    if (width < 1 || height < 1 || in_height < 1 || in_width < 1) {
        throw std::invalid_argument("input and output sizes must be positive");
    }
    py::array_t<uint8_t> out({height, width, kChannels});
    const auto* src = static_cast<const uint8_t*>(pixels.data());
    uint8_t* dst = out.mutable_data();
    const int64_t pitch = pixels.strides(0);
    {
        py::gil_scoped_release release;
        resample_rgb(src, in_height, in_width, pitch, height, width, filter, pick_convolve_lines(simd), dst);
    }
    return out;
}


// ---- Affine transforms: PIL's Image.transform(size, AFFINE, a, BILINEAR|BICUBIC, fillcolor=fill) of an RGB image
// (Pillow's libImaging/Geometry.c: ImagingGenericTransform with affine_transform and the *_filter32RGB filters).
// Each output pixel (x, y) samples the input at (a0 (x+.5) + a1 (y+.5) + a2, a3 (x+.5) + a4 (y+.5) + a5); outside
// the input it is the fill colour. The arithmetic is PIL's, in double precision and in PIL's order, so the pixels
// are PIL's; the AVX2 path computes the three channels of a pixel in one 4-lane register.

int floor_to_int(double x) { return x < 0.0 ? static_cast<int>(std::floor(x)) : static_cast<int>(x); }  // PIL's FLOOR
int clamp_index(int i, int size) { return i < 0 ? 0 : i < size ? i : size - 1; }

struct AffineSource {
    const uint8_t* data;  // [height, pitch]; one readable byte after the last pixel (for 4-byte pixel loads)
    int height, width;
    int64_t pitch;
};

// where output pixel (x, y) samples, shifted to pixel-centre coordinates; false when outside the input
bool affine_source_point(const double* a, int x, int y, const AffineSource& in, double* sx, double* sy) {
    const double xin = x + 0.5, yin = y + 0.5;
    const double xx = a[0] * xin + a[1] * yin + a[2];
    const double yy = a[3] * xin + a[4] * yin + a[5];
    if (xx < 0.0 || xx >= in.width || yy < 0.0 || yy >= in.height) return false;
    *sx = xx - 0.5;
    *sy = yy - 0.5;
    return true;
}

double cubic(double v1, double v2, double v3, double v4, double d) {  // PIL's BICUBIC macro (Keys, a = -0.5)
    const double p1 = v2;
    const double p2 = -v1 + v3;
    const double p3 = 2 * (v1 - v2) + v3 - v4;
    const double p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

uint8_t truncate_clipped(double v) { return v <= 0.0 ? 0 : v >= 255.0 ? 255 : static_cast<uint8_t>(v); }

// One output pixel, channel by channel (PIL's loops).
inline void affine_pixel_portable(const AffineSource& in, double sx, double sy, bool bicubic, uint8_t* out) {
    int x = floor_to_int(sx), y = floor_to_int(sy);
    const double dx = sx - x, dy = sy - y;
    if (!bicubic) {
        const int x0 = clamp_index(x, in.width) * kChannels, x1 = clamp_index(x + 1, in.width) * kChannels;
        const uint8_t* row = in.data + clamp_index(y, in.height) * in.pitch;
        const uint8_t* next = y + 1 >= 0 && y + 1 < in.height ? in.data + (y + 1) * in.pitch : nullptr;
        for (int c = 0; c < kChannels; ++c) {
            const double top = row[x0 + c] + (row[x1 + c] - row[x0 + c]) * dx;
            const double bottom = next ? next[x0 + c] + (next[x1 + c] - next[x0 + c]) * dx : top;
            out[c] = static_cast<uint8_t>(top + (bottom - top) * dy);
        }
        return;
    }
    --x;
    --y;
    int columns[4];
    for (int i = 0; i < 4; ++i) columns[i] = clamp_index(x + i, in.width) * kChannels;
    for (int c = 0; c < kChannels; ++c) {
        double rows[4];
        for (int j = 0; j < 4; ++j) {
            if (j > 0 && !(y + j >= 0 && y + j < in.height)) {  // below the image: the row above repeats
                rows[j] = rows[j - 1];
                continue;
            }
            const uint8_t* row = in.data + (j == 0 ? clamp_index(y, in.height) : y + j) * in.pitch + c;
            rows[j] = cubic(row[columns[0]], row[columns[1]], row[columns[2]], row[columns[3]], dx);
        }
        out[c] = truncate_clipped(cubic(rows[0], rows[1], rows[2], rows[3], dy));
    }
}

#if BEIT_HAVE_AVX2
// The same pixel, the three channels (and one spare lane) of each tap in one register of 4 doubles: the same IEEE
// operations in the same order per lane, so the same results.
#define BEIT_AVX2 __attribute__((target("avx2"))) inline

BEIT_AVX2 __m256d pixel_lanes(const uint8_t* pixel) {  // R, G, B and the next byte, as doubles
    uint32_t word;
    std::memcpy(&word, pixel, sizeof(word));
    return _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(word))));
}

BEIT_AVX2 __m256d lerp_lanes(const uint8_t* row, int x0, int x1, __m256d d) {  // PIL's BILINEAR macro
    const __m256d left = pixel_lanes(row + x0);
    return _mm256_add_pd(left, _mm256_mul_pd(_mm256_sub_pd(pixel_lanes(row + x1), left), d));
}

BEIT_AVX2 __m256d cubic_lanes(__m256d v1, __m256d v2, __m256d v3, __m256d v4, __m256d d) {  // `cubic`, per lane
    const __m256d twice_difference = _mm256_mul_pd(_mm256_set1_pd(2.0), _mm256_sub_pd(v1, v2));
    const __m256d p2 = _mm256_sub_pd(v3, v1);                                                      // -v1 + v3
    const __m256d p3 = _mm256_sub_pd(_mm256_add_pd(twice_difference, v3), v4);                     // 2(v1-v2)+v3-v4
    const __m256d p4 = _mm256_add_pd(_mm256_sub_pd(_mm256_sub_pd(v2, v1), v3), v4);               // -v1+v2-v3+v4
    const __m256d inner = _mm256_add_pd(p3, _mm256_mul_pd(d, p4));
    return _mm256_add_pd(v2, _mm256_mul_pd(d, _mm256_add_pd(p2, _mm256_mul_pd(d, inner))));     // p1 = v2
}

BEIT_AVX2 void affine_pixel_avx2(const AffineSource& in, double sx, double sy, bool bicubic, uint8_t* out) {
    int x = floor_to_int(sx), y = floor_to_int(sy);
    const __m256d dx = _mm256_set1_pd(sx - x), dy = _mm256_set1_pd(sy - y);
    __m256d value;
    if (!bicubic) {
        const int x0 = clamp_index(x, in.width) * kChannels, x1 = clamp_index(x + 1, in.width) * kChannels;
        const __m256d top = lerp_lanes(in.data + clamp_index(y, in.height) * in.pitch, x0, x1, dx);
        const __m256d bottom =
            y + 1 >= 0 && y + 1 < in.height ? lerp_lanes(in.data + (y + 1) * in.pitch, x0, x1, dx) : top;
        value = _mm256_add_pd(top, _mm256_mul_pd(_mm256_sub_pd(bottom, top), dy));
    } else {
        --x;
        --y;
        int columns[4];
        for (int i = 0; i < 4; ++i) columns[i] = clamp_index(x + i, in.width) * kChannels;
        __m256d rows[4];
        for (int j = 0; j < 4; ++j) {
            if (j > 0 && !(y + j >= 0 && y + j < in.height)) {  // below the image: the row above repeats
                rows[j] = rows[j - 1];
                continue;
            }
            const uint8_t* row = in.data + (j == 0 ? clamp_index(y, in.height) : y + j) * in.pitch;
            rows[j] = cubic_lanes(pixel_lanes(row + columns[0]), pixel_lanes(row + columns[1]),
                                  pixel_lanes(row + columns[2]), pixel_lanes(row + columns[3]), dx);
        }
        value = cubic_lanes(rows[0], rows[1], rows[2], rows[3], dy);
        value = _mm256_min_pd(_mm256_max_pd(value, _mm256_setzero_pd()), _mm256_set1_pd(255.0));
    }
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), _mm256_cvttpd_epi32(value));  // truncation, as PIL's cast
    for (int c = 0; c < kChannels; ++c) out[c] = static_cast<uint8_t>(lanes[c]);
}
#endif

// Every output pixel: the fill colour where the map leaves the input, the filter's value elsewhere.
#define BEIT_AFFINE_ROWS(pixel_function)                                                                 \
    for (int y = 0; y < in.height; ++y) {                                                                \
        for (int x = 0; x < in.width; ++x) {                                                             \
            uint8_t* target = dst + (static_cast<int64_t>(y) * in.width + x) * kChannels;                \
            double sx, sy;                                                                               \
            if (affine_source_point(a, x, y, in, &sx, &sy)) {                                            \
                pixel_function(in, sx, sy, bicubic, target);                                             \
            } else {                                                                                     \
                std::memcpy(target, fill, kChannels);                                                    \
            }                                                                                            \
        }                                                                                                \
    }

void affine_portable(const AffineSource& in, const double* a, bool bicubic, const uint8_t* fill, uint8_t* dst) {
    BEIT_AFFINE_ROWS(affine_pixel_portable)
}

#if BEIT_HAVE_AVX2
__attribute__((target("avx2"))) void affine_avx2(const AffineSource& in, const double* a, bool bicubic,
                                                 const uint8_t* fill, uint8_t* dst) {
    BEIT_AFFINE_ROWS(affine_pixel_avx2)
}
#endif
#undef BEIT_AFFINE_ROWS

py::array_t<uint8_t> affine(const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& pixels,
                            const std::vector<double>& coefficients, const std::string& filter_name,
                            const std::vector<int>& fill, bool simd) {
    if (filter_name != "bilinear" && filter_name != "bicubic") {
        throw std::invalid_argument("affine filter must be 'bilinear' or 'bicubic', got '" + filter_name + "'");
    }
    if (pixels.ndim() != 3 || pixels.shape(2) != 3) throw std::invalid_argument("expected a uint8 [H, W, 3] array");
    if (coefficients.size() != 6 || fill.size() != 3) {
        throw std::invalid_argument("expected 6 affine coefficients and an RGB fill colour");
    }
    const int height = static_cast<int>(pixels.shape(0)), width = static_cast<int>(pixels.shape(1));
    const int64_t bytes = static_cast<int64_t>(height) * width * kChannels;
    std::vector<uint8_t> padded(bytes + 1);  // one spare byte: the 4-byte load of the last pixel stays inside
    std::memcpy(padded.data(), pixels.data(), bytes);
    const uint8_t fill_rgb[3] = {static_cast<uint8_t>(fill[0]), static_cast<uint8_t>(fill[1]),
                                 static_cast<uint8_t>(fill[2])};
    py::array_t<uint8_t> out({height, width, kChannels});
    uint8_t* dst = out.mutable_data();
    const AffineSource in{padded.data(), height, width, static_cast<int64_t>(width) * kChannels};
    const bool bicubic = filter_name == "bicubic";
    {
        py::gil_scoped_release release;
#if BEIT_HAVE_AVX2
        if (simd && __builtin_cpu_supports("avx2")) {
            affine_avx2(in, coefficients.data(), bicubic, fill_rgb, dst);
        } else {
            affine_portable(in, coefficients.data(), bicubic, fill_rgb, dst);
        }
#else
        (void)simd;
        affine_portable(in, coefficients.data(), bicubic, fill_rgb, dst);
#endif
    }
    return out;
}

// ---- Saturation and hue (mmseg's PhotoMetricDistortion): engine/data/segmentation.py's float32 HSV round trip,
// the same float32 operations per pixel in the same order (numpy's `%` is fmod moved into [0, 6), np.rint is
// round-half-even), so the same bytes, without numpy's dozen temporaries of the whole image.

float float_mod6(float x) {  // numpy's float32 remainder for a divisor of 6
    float mod = std::fmod(x, 6.0f);
    if (mod != 0.0f) {
        if (mod < 0.0f) mod += 6.0f;
    } else {
        mod = 0.0f;  // copysign(0, 6)
    }
    return mod;
}

void adjust_hsv(uint8_t* pixels, int64_t count, bool scale_saturation, float saturation, bool shift_hue, float shift) {
    for (int64_t i = 0; i < count; ++i) {
        uint8_t* rgb = pixels + i * kChannels;
        const float red = rgb[0], green = rgb[1], blue = rgb[2];
        const float value = std::max(std::max(red, green), blue);
        const float chroma = value - std::min(std::min(red, green), blue);
        const float safe = chroma > 0.0f ? chroma : 1.0f;
        float hue = value == red ? float_mod6((green - blue) / safe)
                    : value == green ? (blue - red) / safe + 2.0f : (red - green) / safe + 4.0f;
        hue = chroma > 0.0f ? hue : 0.0f;
        float sat = value > 0.0f ? chroma / std::max(value, 1.0f) : 0.0f;
        if (scale_saturation) sat = std::min(std::max(sat * saturation, 0.0f), 1.0f);
        if (shift_hue) hue = float_mod6(hue + shift);
        const float offsets[3] = {5.0f, 3.0f, 1.0f};  // R, G, B: f(n) = v (1 - s clip(min(k, 4 - k), 0, 1))
        for (int c = 0; c < kChannels; ++c) {
            const float k = float_mod6(offsets[c] + hue);
            const float ramp = std::min(std::max(std::min(k, 4.0f - k), 0.0f), 1.0f);
            const float channel = std::nearbyint(value * (1.0f - sat * ramp));
            rgb[c] = static_cast<uint8_t>(std::min(std::max(channel, 0.0f), 255.0f));
        }
    }
}

py::array_t<uint8_t> saturation_hue(const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& pixels,
                                    py::object saturation, py::object hue_shift) {
    if (pixels.ndim() != 3 || pixels.shape(2) != 3) throw std::invalid_argument("expected a uint8 [H, W, 3] array");
    py::array_t<uint8_t> out({pixels.shape(0), pixels.shape(1), static_cast<py::ssize_t>(kChannels)});
    const int64_t count = pixels.shape(0) * pixels.shape(1);
    std::memcpy(out.mutable_data(), pixels.data(), count * kChannels);
    const bool scale = !saturation.is_none(), shift = !hue_shift.is_none();
    // numpy turns a Python float operand into float32 before the float32 arithmetic (NEP 50)
    const float factor = scale ? static_cast<float>(saturation.cast<double>()) : 0.0f;
    const float sextants = shift ? static_cast<float>(hue_shift.cast<double>() / 30) : 0.0f;
    {
        py::gil_scoped_release release;
        adjust_hsv(out.mutable_data(), count, scale, factor, shift, sextants);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_native_pixels, m) {
    m.doc() = "The workers' pixel maps with PIL's (and numpy's) arithmetic, bit for bit (engine/data/pixels.py).";
    m.def("resample", &resample, py::arg("pixels"), py::arg("width"), py::arg("height"), py::arg("filter"),
          py::arg("simd") = true,
          "uint8 [H, W, 3] pixels (rows may be strided, e.g. a crop view) resampled to [height, width, 3] as PIL's "
          "Image.resize((width, height), filter) would, horizontal pass first. `simd=False` forces the portable "
          "loops (the same pixels; for tests on machines that have AVX2).");
    m.def("affine", &affine, py::arg("pixels"), py::arg("coefficients"), py::arg("filter"), py::arg("fill"),
          py::arg("simd") = true,
          "uint8 [H, W, 3] pixels through the affine map `coefficients` (a0..a5, output -> input, as PIL's) with "
          "'bilinear' or 'bicubic' sampling and the RGB `fill` outside: PIL's Image.transform(size, AFFINE, ...).");
    m.def("saturation_hue", &saturation_hue, py::arg("pixels"), py::arg("saturation"), py::arg("hue_shift"),
          "uint8 [H, W, 3] RGB with HSV saturation scaled by `saturation` and hue shifted by `hue_shift` OpenCV units "
          "(2 degrees), either None to skip it: engine.data.segmentation's float32 HSV round trip, byte for byte.");
}
