// A vectorisable exp for the CPU kernel headers. No include guard and no includes on purpose: it
// is included by each kernel header, inside the namespace of every instruction set
// (isa_variants.h), so each variant gets its own vector code.

// exp over a contiguous array. double: std::exp. float: a loop the compiler vectorises (libm's
// expf is a call per element and was a third of the forward): exp(x) = 2^n · 2^f with n the
// nearest integer to x·log2(e) and |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (relative
// error below 1e-8, under float rounding), 2^n put into the exponent bits. Inputs are clamped at
// -87 (the result is then ~1e-38, zero for a softmax weight next to a weight of 1); NaN passes.
inline void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

inline void exp_inplace(float* x, int64_t n) {
  constexpr float kLn2 = 0.6931471805599453f;
  constexpr float c1 = kLn2, c2 = c1 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4,
                  c5 = c4 * kLn2 / 5, c6 = c5 * kLn2 / 6, c7 = c6 * kLn2 / 7;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i] < -87.f ? -87.f : x[i];
    const float y = xi * 1.4426950408889634f;
    // Round to nearest by the 1.5·2^23 trick (exact for |y| < 2^22): unlike nearbyint it
    // vectorises, and without -ffast-math the compiler keeps the two additions.
    const float r = (y + 12582912.f) - 12582912.f;
    const float f = y - r;
    const float p = 1.f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * c7))))));
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    // The builtin behind C++20's std::bit_cast: torch 2.11 and older build extensions as C++17.
    x[i] = p * __builtin_bit_cast(float, bits);
  }
}
