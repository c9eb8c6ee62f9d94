// Minimal C++ stand-ins for the MSL constructs the qaq sections of kernels/dequantize.h and kernels/quantize.h use
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#define device
#define thread
#define constant const
template <typename T, typename S> static inline T as_type(S s) { static_assert(sizeof(T) == sizeof(S), "as_type"); T t; std::memcpy(&t, &s, sizeof t); return t; }
struct float4   { float v[4]; float & operator[](int i) { return v[i]; } };
struct float4x4 { float4 c[4]; float4 & operator[](int i) { return c[i]; } };
using std::isfinite;
using std::fabs;
using std::sqrt;  // float sqrt as in MSL (the global ::sqrt is the double one)
