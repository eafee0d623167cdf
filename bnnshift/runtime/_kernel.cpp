// bnnshift packed binary conv / linear: XNOR + popcount on CPU (layout: runtime/ref.py).
// One op: bconv2d; a linear layer is a 1x1 conv on a 1x1 input. Multi-threaded with
// at::parallel_for over (image, output row, block of output channels).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
void pack_act(const T* x, uint64_t* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t G, int64_t Cw) {
  const int64_t Cg = C / G, row = W * G * Cw;
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      uint64_t* o = out + nh * row;
      std::fill(o, o + row, 0ull);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / Cg, cc = c % Cg, word = g * Cw + (cc >> 6);
        const uint64_t bit = 1ull << (cc & 63);
        const T* src = x + ((n * C + c) * H + h) * W;
        for (int64_t w = 0; w < W; ++w)
          if (src[w] > 0) o[w * G * Cw + word] |= bit;
      }
    }
  });
}

template <typename T>
void conv(const uint64_t* a, const uint64_t* wt, const int32_t* popw, const T* alpha, const T* bias, T* out,
          int64_t N, int64_t H, int64_t W, int64_t G, int64_t Cw, int64_t Cg, int64_t O, int64_t KH, int64_t KW,
          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
          bool zero_one) {
  const int64_t Og = O / G, taps = KH * KW, K = taps * Cw;
  const int64_t OB = 16, nob = (O + OB - 1) / OB;
  at::parallel_for(0, N * Ho * nob, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> buf(G * K);
    std::vector<char> valid(taps);
    for (int64_t it = b; it < e; ++it) {
      const int64_t ob = it % nob, nh = it / nob, n = nh / Ho, oh = nh % Ho;
      const int64_t o0 = ob * OB, o1 = std::min(O, o0 + OB);
      for (int64_t ow = 0; ow < Wo; ++ow) {
        int64_t nvalid = 0;
        bool border = false;
        for (int64_t i = 0; i < KH; ++i)
          for (int64_t j = 0; j < KW; ++j) {
            const int64_t ih = oh * sh - ph + i * dh, iw = ow * sw - pw + j * dw, t = i * KW + j;
            const bool v = ih >= 0 && ih < H && iw >= 0 && iw < W;
            valid[t] = v;
            nvalid += v;
            border |= !v;
            for (int64_t g = 0; g < G; ++g) {
              uint64_t* dst = buf.data() + g * K + t * Cw;
              if (v) {
                const uint64_t* src = a + ((n * H + ih) * W + iw) * G * Cw + g * Cw;
                for (int64_t k = 0; k < Cw; ++k) dst[k] = src[k];
              } else {
                for (int64_t k = 0; k < Cw; ++k) dst[k] = 0;
              }
            }
          }
        for (int64_t o = o0; o < o1; ++o) {
          const uint64_t* x = buf.data() + (o / Og) * K;
          const uint64_t* w = wt + o * K;
          int64_t s = 0;
          for (int64_t k = 0; k < K; ++k) s += __builtin_popcountll(x[k] ^ w[k]);
          int64_t dot;
          const int32_t* pwo = popw + o * taps;
          if (zero_one) {  // sum over taps of popcount(w) - popcount(a ^ w); a padded tap (a = 0) gives 0
            int64_t pwsum = 0;
            for (int64_t t = 0; t < taps; ++t) pwsum += pwo[t];
            dot = pwsum - s;
          } else {  // padded taps held 0 words: their popcount(0 ^ w) is not part of the sum
            if (border)
              for (int64_t t = 0; t < taps; ++t)
                if (!valid[t]) s -= pwo[t];
            dot = nvalid * Cg - 2 * s;
          }
          T y = static_cast<T>(dot) * alpha[o];
          if (bias) y = y + bias[o];
          out[((n * O + o) * Ho + oh) * Wo + ow] = y;
        }
      }
    }
  });
}

}  // namespace

torch::Tensor bconv2d(torch::Tensor x, torch::Tensor wwords, torch::Tensor popw, torch::Tensor alpha,
                      c10::optional<torch::Tensor> bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
                      std::vector<int64_t> dilation, int64_t groups, bool zero_one) {
  TORCH_CHECK(x.dim() == 4, "bconv2d: x must be (N, C, H, W)");
  TORCH_CHECK(wwords.scalar_type() == torch::kInt64 && popw.scalar_type() == torch::kInt32, "bconv2d: bad packed weight");
  x = x.contiguous();
  wwords = wwords.contiguous();
  popw = popw.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = wwords.size(0), KH = wwords.size(1), KW = wwords.size(2), Cw = wwords.size(3);
  const int64_t G = groups, Cg = C / G;
  TORCH_CHECK(C % G == 0 && O % G == 0 && (Cg + 63) / 64 == Cw, "bconv2d: channels do not match the packed weight");
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  auto a = torch::empty({N, H, W, G * Cw}, x.options().dtype(torch::kInt64));
  auto out = torch::empty({N, O, Ho, Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bconv2d", [&] {
    auto al = alpha.to(x.scalar_type()).contiguous();
    torch::Tensor bi;
    if (bias && bias->defined()) bi = bias->to(x.scalar_type()).contiguous();
    pack_act<scalar_t>(x.data_ptr<scalar_t>(), reinterpret_cast<uint64_t*>(a.data_ptr<int64_t>()), N, C, H, W, G, Cw);
    conv<scalar_t>(reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>()),
                   reinterpret_cast<const uint64_t*>(wwords.data_ptr<int64_t>()), popw.data_ptr<int32_t>(),
                   al.data_ptr<scalar_t>(), bi.defined() ? bi.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                   N, H, W, G, Cw, Cg, O, KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0],
                   dilation[1], Ho, Wo, zero_one);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("bconv2d", &bconv2d, "packed binary conv2d (XNOR + popcount)"); }
