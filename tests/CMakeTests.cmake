# Extra CTest cases (included from tests/CMakeLists.txt).

# Consumer-project test: install this build tree into a scratch prefix, build tests/consumer
# against it with find_package(cacheshrink CONFIG REQUIRED), run it on a fixture.
add_test(NAME consumer_project
  COMMAND ${CMAKE_COMMAND}
    -DBUILD_DIR=${CMAKE_BINARY_DIR}
    -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
    -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/consumer_test
    -DMODEL_DIR=${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3
    -DEXPECT_LAYERS=4
    -DBUILD_TYPE=$<IF:$<CONFIG:>,Release,$<CONFIG>>
    -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
    -P ${CMAKE_CURRENT_SOURCE_DIR}/consumer/run_consumer_test.cmake)
set_tests_properties(consumer_project PROPERTIES LABELS "packaging" TIMEOUT 600)
