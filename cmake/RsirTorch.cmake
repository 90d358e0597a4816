# rsir_torch_target(): the imported target rsir::torch, to build against the torch of a Python
# interpreter (RSIR_PYTHON, default: the python3 on PATH). Sets RSIR_TORCH_FOUND and RSIR_TORCH_LIBDIR.
#
# torch's own CMake config is used where it configures. The CUDA wheel's config stops with a
# fatal error when no CUDA toolkit is found, and a fatal error can't be caught, so that config is
# first tried in a throwaway sub-configure; where it fails, the target is made from torch's
# include and library folders (torch.utils.cpp_extension), which is all a CPU build needs.
function(rsir_torch_target)
  set(RSIR_TORCH_FOUND OFF PARENT_SCOPE)
  if(TARGET rsir::torch)
    set(RSIR_TORCH_FOUND ON PARENT_SCOPE)
    return()
  endif()
  if(NOT RSIR_PYTHON)
    find_program(RSIR_PYTHON NAMES python3 python)
  endif()
  if(NOT RSIR_PYTHON)
    message(STATUS "rsir: no Python found (set RSIR_PYTHON): not building against torch")
    return()
  endif()
  execute_process(
    COMMAND "${RSIR_PYTHON}" -c "import torch, torch.utils, torch.utils.cpp_extension as c
print(torch.utils.cmake_prefix_path); print(';'.join(c.include_paths())); print(c.library_paths()[0])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)"
    OUTPUT_VARIABLE out RESULT_VARIABLE rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(STATUS "rsir: ${RSIR_PYTHON} can't import torch: not building against torch")
    return()
  endif()
  string(REPLACE "\n" ";" out "${out}")
  list(GET out 0 prefix)
  list(GET out -3 libdir)
  list(GET out -2 abi)
  list(GET out -1 version)
  list(SUBLIST out 1 2 includes)

  set(probe "${CMAKE_BINARY_DIR}/rsir_torch_probe")
  file(WRITE "${probe}/CMakeLists.txt"
       "cmake_minimum_required(VERSION 3.18)\nproject(probe CXX)\nfind_package(Torch REQUIRED)\n")
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${probe}" -B "${probe}/build" "-DCMAKE_PREFIX_PATH=${prefix}"
                  RESULT_VARIABLE probe_rc OUTPUT_QUIET ERROR_QUIET)
  add_library(rsir::torch INTERFACE IMPORTED GLOBAL)
  set_target_properties(rsir::torch PROPERTIES INTERFACE_COMPILE_FEATURES cxx_std_20)  # torch's headers
  if(probe_rc EQUAL 0)
    list(APPEND CMAKE_PREFIX_PATH "${prefix}")
    find_package(Torch REQUIRED)
    set_target_properties(rsir::torch PROPERTIES INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}")
    set(how "torch's CMake config")
  else()
    set_target_properties(rsir::torch PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${includes}"
      INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${abi}"
      # libtorch.so kept even where nothing names it (--as-needed would drop it): an AOTInductor
      # package's model library needs it, and only a library already loaded can satisfy that
      INTERFACE_LINK_LIBRARIES "-Wl,--push-state,--no-as-needed;${libdir}/libtorch.so;-Wl,--pop-state;${libdir}/libtorch_cpu.so;${libdir}/libc10.so")
    set(how "torch's include and lib folders (its CMake config did not configure here: no CUDA toolkit?)")
  endif()
  message(STATUS "rsir: torch ${version} from ${RSIR_PYTHON}, through ${how}")
  set(RSIR_TORCH_FOUND ON PARENT_SCOPE)
  set(RSIR_TORCH_LIBDIR "${libdir}" PARENT_SCOPE)
endfunction()
