// Native BEiT block-wise masking: the algorithm of `engine/data/masking.py` (unilm `beit/masking_generator.py`)
// for a batch of samples, with the GIL released and optional threads over samples.
//
// Every sample gets its own random stream, seeded from (seed, epoch, index) through splitmix64 into xoshiro256**,
// so a sample's mask depends only on those three numbers: not on the batch it is in, its position there, or the
// thread count. The stream differs from numpy's, so native masks differ from Python masks for the same sample;
// the distribution is the same because the algorithm and the meaning of every draw are the same:
//   uniform(a, b) = a + (b - a) * u, u in [0, 1)  (Python's random.uniform: reversed bounds allowed)
//   randint(0, n) inclusive of n, unbiased        (Python's random.randint)
//   round() half to even                           (Python's round; std::nearbyint in the default rounding mode)

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kAttemptsPerBlock = 10;  // the official generator gives each block 10 tries

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// xoshiro256** (Blackman & Vigna): small state, so seeding one per sample is cheap.
class Xoshiro256 {
  public:
    Xoshiro256(uint64_t seed, uint64_t epoch, uint64_t index) {
        // Mix the three keys one after another so that (s, e, i) and any permutation of it give unrelated streams.
        uint64_t mix = 0x6A09E667F3BCC909ULL;
        for (uint64_t key : {seed, epoch, index}) {
            mix ^= key;
            mix = splitmix64(mix);
        }
        for (uint64_t& word : state_) word = splitmix64(mix);
    }

    uint64_t next() {
        const uint64_t result = rotl(state_[1] * 5, 7) * 9;
        const uint64_t t = state_[1] << 17;
        state_[2] ^= state_[0];
        state_[3] ^= state_[1];
        state_[1] ^= state_[2];
        state_[0] ^= state_[3];
        state_[2] ^= t;
        state_[3] = rotl(state_[3], 45);
        return result;
    }

    // U[0, 1) with 53 random bits.
    double unit() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

    // Python's random.uniform: also valid when high < low.
    double uniform(double low, double high) { return low + (high - low) * unit(); }

    // Python's random.randint(0, high): uniform over {0, ..., high}, by rejection so no value is favoured.
    int64_t randint_inclusive(int64_t high) {
        const uint64_t range = static_cast<uint64_t>(high) + 1;
        const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % range;
        uint64_t draw = next();
        while (draw >= limit) draw = next();
        return static_cast<int64_t>(draw % range);
    }

  private:
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t state_[4];
};

struct MaskSpec {
    int64_t height;
    int64_t width;
    int64_t num_masking_patches;
    double min_num_patches;
    int64_t max_num_patches;
    double log_aspect_min;
    double log_aspect_max;
};

// One block: up to 10 attempts to place a rectangle that adds 1..max_mask new patches. Returns the patches added.
int64_t place_block(const MaskSpec& spec, bool* mask, int64_t max_mask, Xoshiro256& rng) {
    for (int attempt = 0; attempt < kAttemptsPerBlock; ++attempt) {
        const double target_area = rng.uniform(spec.min_num_patches, static_cast<double>(max_mask));
        const double aspect = std::exp(rng.uniform(spec.log_aspect_min, spec.log_aspect_max));
        const auto h = static_cast<int64_t>(std::nearbyint(std::sqrt(target_area * aspect)));
        const auto w = static_cast<int64_t>(std::nearbyint(std::sqrt(target_area / aspect)));
        if (w >= spec.width || h >= spec.height) continue;  // a block never spans the full grid

        const int64_t top = rng.randint_inclusive(spec.height - h);
        const int64_t left = rng.randint_inclusive(spec.width - w);
        int64_t already_masked = 0;
        for (int64_t i = top; i < top + h; ++i)
            for (int64_t j = left; j < left + w; ++j) already_masked += mask[i * spec.width + j];

        const int64_t added = h * w - already_masked;
        if (added > 0 && added <= max_mask) {
            for (int64_t i = top; i < top + h; ++i) {
                bool* row = mask + i * spec.width + left;
                std::fill(row, row + w, true);
            }
            return added;
        }
    }
    return 0;
}

// mask: [height * width], zeroed by the caller.
void generate_one(const MaskSpec& spec, bool* mask, Xoshiro256& rng) {
    int64_t count = 0;
    while (count < spec.num_masking_patches) {
        const int64_t max_mask = std::min(spec.num_masking_patches - count, spec.max_num_patches);
        const int64_t added = place_block(spec, mask, max_mask, rng);
        if (added == 0) break;  // 10 failed attempts end the mask early, as in the official generator
        count += added;
    }
}

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

py::array_t<bool> generate_masks(int64_t height, int64_t width, int64_t num_masking_patches, double min_num_patches,
                                 int64_t max_num_patches, double log_aspect_min, double log_aspect_max, uint64_t seed,
                                 uint64_t epoch, const IndexArray& indices, int num_threads) {
    if (height < 2 || width < 2) throw py::value_error("generate_masks: height and width must be >= 2");
    if (indices.ndim() != 1) throw py::value_error("generate_masks: indices must be a 1-D integer array");
    if (num_threads < 1) throw py::value_error("generate_masks: num_threads must be >= 1");
    const int64_t n = indices.shape(0);
    const int64_t* index_data = indices.data();
    for (int64_t k = 0; k < n; ++k)
        if (index_data[k] < 0) throw py::value_error("generate_masks: indices must be non-negative");

    const MaskSpec spec{height, width, num_masking_patches, min_num_patches, max_num_patches, log_aspect_min,
                        log_aspect_max};
    py::array_t<bool> out({n, height, width});  // [n, h, w]
    bool* out_data = out.mutable_data();
    const int64_t mask_size = height * width;

    {
        py::gil_scoped_release release;
        std::fill(out_data, out_data + n * mask_size, false);
        auto run_range = [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k) {
                Xoshiro256 rng(seed, epoch, static_cast<uint64_t>(index_data[k]));
                generate_one(spec, out_data + k * mask_size, rng);
            }
        };
        const int64_t workers = std::min<int64_t>(num_threads, n);
        if (workers <= 1) {
            run_range(0, n);
        } else {
            std::vector<std::thread> threads;
            const int64_t chunk = (n + workers - 1) / workers;
            for (int64_t begin = 0; begin < n; begin += chunk)
                threads.emplace_back(run_range, begin, std::min(n, begin + chunk));
            for (std::thread& thread : threads) thread.join();
        }
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_native_masking, m) {
    m.doc() = "Native BEiT block-wise masking (see engine/data/masking.py for the Python reference).";
    m.def("generate_masks", &generate_masks, py::arg("height"), py::arg("width"), py::arg("num_masking_patches"),
          py::arg("min_num_patches"), py::arg("max_num_patches"), py::arg("log_aspect_min"), py::arg("log_aspect_max"),
          py::arg("seed"), py::arg("epoch"), py::arg("indices"), py::arg("num_threads") = 1,
          "Masks for samples `indices` of (seed, epoch) -> bool array [n, height, width]. Arguments are validated by "
          "engine.data.masking.MaskingGenerator; each sample's mask depends only on (seed, epoch, index).");
}
