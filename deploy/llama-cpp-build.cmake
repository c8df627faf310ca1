# Included at the end of llama.cpp's project() while pip builds llama-cpp-python (the Makefile
# passes it in CMAKE_ARGS as CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python's Python package
# loads libllama and libggml only; it forces llama.cpp's "common" library on (and with it
# cpp-httplib), which nothing of the package or its server loads. A normal variable here hides
# that cache entry inside llama.cpp's directory, so neither is compiled or installed: the build
# is the library alone.
set(LLAMA_BUILD_COMMON OFF)
