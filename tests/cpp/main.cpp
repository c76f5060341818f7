// Catch2 v2 main, in a file of its own so test files rebuild without it.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
