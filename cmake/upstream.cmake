# Obtain the pinned llama.cpp tree and apply patches/ to a copy of it.
#
# pkv_prepare_upstream(SOURCE <dir|archive|""> CACHE_DIR <dir> PATCH_DIR <dir>
#                      OUT_TREE <var> OUT_PYLAYER <var>)
# SOURCE may be: the llama-cpp-python sdist archive; its unpacked root (has
# vendor/llama.cpp and llama_cpp/); or a bare llama.cpp tree (then the Python
# layer is not installed). Empty: use the cache, filling it with `pip download`.

function(_pkv_fetch_sdist cache_dir out_archive)
    set(_name "llama_cpp_python-${PYLLM_KV_UPSTREAM_VERSION}.tar.gz")
    set(_archive "${cache_dir}/${_name}")
    if (NOT EXISTS "${_archive}")
        find_package(Python COMPONENTS Interpreter REQUIRED)
        message(STATUS "pyllm-kv: downloading ${PYLLM_KV_UPSTREAM_PKG}==${PYLLM_KV_UPSTREAM_VERSION} sdist with pip into ${cache_dir}")
        file(MAKE_DIRECTORY "${cache_dir}")
        # --no-binary for this package only: its build dependencies may be wheels.
        # --no-build-isolation: its metadata step needs only scikit-build-core,
        # which this build already has.
        execute_process(
            COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps
                    --no-binary ${PYLLM_KV_UPSTREAM_PKG} --no-build-isolation
                    ${PYLLM_KV_UPSTREAM_PKG}==${PYLLM_KV_UPSTREAM_VERSION} -d "${cache_dir}"
            RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
        if (NOT _rc EQUAL 0 OR NOT EXISTS "${_archive}")
            message(FATAL_ERROR
                "pyllm-kv: could not download the ${PYLLM_KV_UPSTREAM_PKG}==${PYLLM_KV_UPSTREAM_VERSION} sdist.\n"
                "Without network, pass an unpacked tree or the archive: "
                "PYLLM_KV_LLAMA_SRC=/path/to/${_name} pip install .\n${_out}\n${_err}")
        endif()
    endif()
    set(${out_archive} "${_archive}" PARENT_SCOPE)
endfunction()

function(_pkv_unpack archive cache_dir out_root)
    file(SHA256 "${archive}" _sha)
    set(_root "${cache_dir}/src-${_sha}")
    if (NOT EXISTS "${_root}/.unpacked")
        message(STATUS "pyllm-kv: unpacking ${archive}")
        file(REMOVE_RECURSE "${_root}")
        file(MAKE_DIRECTORY "${_root}")
        file(ARCHIVE_EXTRACT INPUT "${archive}" DESTINATION "${_root}")
        file(TOUCH "${_root}/.unpacked")
    endif()
    file(GLOB _top LIST_DIRECTORIES true "${_root}/llama_cpp_python-*")
    if (NOT _top)
        message(FATAL_ERROR "pyllm-kv: ${archive} is not a llama-cpp-python sdist")
    endif()
    set(${out_root} "${_top}" PARENT_SCOPE)
endfunction()

function(_pkv_apply_patches tree patch_dir)
    file(GLOB _patches "${patch_dir}/*.patch")
    list(SORT _patches)
    find_package(Git QUIET)
    if (GIT_FOUND)
        # A repo of its own, so `git apply` never resolves paths against an
        # enclosing checkout (e.g. when the build folder sits inside ours).
        execute_process(COMMAND "${GIT_EXECUTABLE}" init -q WORKING_DIRECTORY "${tree}")
    endif()
    foreach (_p IN LISTS _patches)
        get_filename_component(_pname "${_p}" NAME)
        if (GIT_FOUND)
            set(_check "${GIT_EXECUTABLE}" apply --check "${_p}")
            set(_apply "${GIT_EXECUTABLE}" apply --whitespace=nowarn "${_p}")
        else()
            find_program(_patch_exe patch REQUIRED)
            set(_check "${_patch_exe}" -p1 --batch --forward --dry-run -i "${_p}")
            set(_apply "${_patch_exe}" -p1 --batch --forward -i "${_p}")
        endif()
        execute_process(COMMAND ${_check} WORKING_DIRECTORY "${tree}"
                        RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
        if (NOT _rc EQUAL 0)
            message(FATAL_ERROR "pyllm-kv: patch ${_pname} does not apply to the llama.cpp tree at ${tree}:\n${_out}${_err}")
        endif()
        execute_process(COMMAND ${_apply} WORKING_DIRECTORY "${tree}" RESULT_VARIABLE _rc)
        if (NOT _rc EQUAL 0)
            message(FATAL_ERROR "pyllm-kv: patch ${_pname} failed while applying")
        endif()
        message(STATUS "pyllm-kv: applied ${_pname}")
    endforeach()
endfunction()

function(pkv_prepare_upstream)
    cmake_parse_arguments(A "" "SOURCE;CACHE_DIR;PATCH_DIR;OUT_TREE;OUT_PYLAYER" "" ${ARGN})

    set(_src "${A_SOURCE}")
    if (_src STREQUAL "")
        _pkv_fetch_sdist("${A_CACHE_DIR}" _src)
    endif()
    if (NOT EXISTS "${_src}")
        message(FATAL_ERROR "pyllm-kv: PYLLM_KV_LLAMA_SRC=${_src} does not exist")
    endif()
    if (NOT IS_DIRECTORY "${_src}")
        _pkv_unpack("${_src}" "${A_CACHE_DIR}" _src)
    endif()

    if (EXISTS "${_src}/vendor/llama.cpp/CMakeLists.txt")
        set(_pristine "${_src}/vendor/llama.cpp")
        set(_pylayer "${_src}/llama_cpp")
    elseif (EXISTS "${_src}/ggml/CMakeLists.txt")
        set(_pristine "${_src}")
        set(_pylayer "")
        message(WARNING "pyllm-kv: ${_src} is a bare llama.cpp tree; the llama_cpp Python layer will not be installed")
    else()
        message(FATAL_ERROR "pyllm-kv: ${_src} is neither a llama-cpp-python sdist nor a llama.cpp tree")
    endif()

    # Re-copy and re-patch whenever the source or any patch changes.
    file(GLOB _patches "${A_PATCH_DIR}/*.patch")
    list(SORT _patches)
    set(_stamp_text "${_pristine}\n")
    foreach (_p IN LISTS _patches)
        set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_p}")
        file(SHA256 "${_p}" _h)
        string(APPEND _stamp_text "${_p} ${_h}\n")
    endforeach()
    set(_tree "${CMAKE_BINARY_DIR}/llama.cpp-patched")
    set(_stamp "${CMAKE_BINARY_DIR}/llama.cpp-patched.stamp")
    set(_old "")
    if (EXISTS "${_stamp}")
        file(READ "${_stamp}" _old)
    endif()
    if (NOT _old STREQUAL _stamp_text OR NOT EXISTS "${_tree}/CMakeLists.txt")
        # Patch a fresh staging copy, then copy over only files whose content
        # changed: editing one patch then rebuilds only what it touches.
        set(_stage "${CMAKE_BINARY_DIR}/llama.cpp-staging")
        message(STATUS "pyllm-kv: patching a copy of ${_pristine}")
        file(REMOVE_RECURSE "${_stage}")
        file(COPY "${_pristine}/" DESTINATION "${_stage}" PATTERN ".git" EXCLUDE)
        _pkv_apply_patches("${_stage}" "${A_PATCH_DIR}")
        file(REMOVE_RECURSE "${_stage}/.git")   # only needed while applying
        execute_process(COMMAND "${CMAKE_COMMAND}" -E copy_directory_if_different "${_stage}" "${_tree}"
                        RESULT_VARIABLE _rc)
        if (NOT _rc EQUAL 0)
            message(FATAL_ERROR "pyllm-kv: could not copy the patched tree to ${_tree}")
        endif()
        file(REMOVE_RECURSE "${_stage}")
        file(WRITE "${_stamp}" "${_stamp_text}")
    endif()

    set(${A_OUT_TREE} "${_tree}" PARENT_SCOPE)
    set(${A_OUT_PYLAYER} "${_pylayer}" PARENT_SCOPE)
endfunction()
