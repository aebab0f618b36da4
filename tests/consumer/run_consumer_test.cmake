# Installs this build tree into a scratch prefix, configures and builds tests/consumer against
# it, then runs the consumer on a fixture. Run with
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... -DMODEL_DIR=... [-DEXPECT_LAYERS=n]
#         [-DBUILD_TYPE=...] [-DCXX_COMPILER=...] -P run_consumer_test.cmake
cmake_minimum_required(VERSION 3.22)

foreach(var BUILD_DIR SOURCE_DIR WORK_DIR MODEL_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(prefix ${WORK_DIR}/prefix)
set(consumer_build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${name} failed (exit ${rc})\n  command: ${ARGN}\n--- stdout ---\n${out}\n--- stderr ---\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
  message(STATUS "consumer test: ${name} ok")
endfunction()

# (a) install the library from this build tree
step("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} --config ${BUILD_TYPE})
if(NOT EXISTS ${prefix}/include/cacheshrink/model/weights.hpp)
  message(FATAL_ERROR "consumer test: the install did not put headers under ${prefix}/include")
endif()

# (b) configure + build the consumer against the installed copy only
set(configure_args -S ${SOURCE_DIR}/tests/consumer -B ${consumer_build} -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_BUILD_TYPE=${BUILD_TYPE} -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
if(CXX_COMPILER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()
step("configure" ${CMAKE_COMMAND} ${configure_args})
step("build" ${CMAKE_COMMAND} --build ${consumer_build} --config ${BUILD_TYPE})

# (c) run it on a fixture
find_program(app NAMES app PATHS ${consumer_build} ${consumer_build}/${BUILD_TYPE} NO_DEFAULT_PATH REQUIRED)
step("run" ${app} ${MODEL_DIR})
message(STATUS "consumer output:\n${step_output}")
if(DEFINED EXPECT_LAYERS AND NOT step_output MATCHES "layers: ${EXPECT_LAYERS}\n")
  message(FATAL_ERROR "consumer test: expected 'layers: ${EXPECT_LAYERS}' in the output")
endif()

file(REMOVE_RECURSE ${WORK_DIR})
