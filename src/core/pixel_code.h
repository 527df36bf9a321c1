// Pixel codes: the `data.domains` of a data set. A code is a table of 256 entries
// applied to every uint8 pixel, so that one data set yields several visually
// distinct domains of the same classes (docs/data.md, "Domains"):
//
//   identity       the pixels as they are
//   invert         255 - v
//   fold           v -> 128 + v/2 and 127 - v/2 in alternating bands of 32 levels:
//                  the background (0) becomes mid-grey and brightness is folded
//                  around it, so no linear read-out of a patch sees the object
//   bands:SPEC     the levels cut into B equal bands (B = entries of SPEC, dividing
//                  256); entry j names the band that source band j moves to, with
//                  `r` when its levels are reversed: bands:2,0r,3,1r
//
// Every code is one-to-one on the levels it uses, except fold, which keeps every
// other level (128 levels).
#pragma once
#include <array>
#include <cstdint>
#include <string>

namespace moeprune {

using PixelCode = std::array<uint8_t, 256>;

// The table of `code`; a UserError naming the code and the expected forms when it
// is malformed.
PixelCode pixel_code(const std::string& code);

}  // namespace moeprune
