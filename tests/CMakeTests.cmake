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

# The command-line program, run briefly on the embedded model (examples are built and run by the tests).
if(TARGET cacheshrink_cli)
  add_test(NAME cli_info COMMAND cacheshrink_cli info --json)
  set_tests_properties(cli_info PROPERTIES PASS_REGULAR_EXPRESSION "\"parameters\": 4458752")
  add_test(NAME cli_eval COMMAND cacheshrink_cli eval --windows 8)
  # HF reference for tiny-llama3, first 8 windows: 89.7016
  set_tests_properties(cli_eval PROPERTIES PASS_REGULAR_EXPRESSION "perplexity: 89\\.7")
  add_test(NAME cli_generate COMMAND cacheshrink_cli generate --prompt-ids 1489,1489,1489,3526,303,86,2610,1489,1489,1489,221,1171,2082,1489,1489,1489 --max-new-tokens 4)
  # reference.json greedy continuation of tiny-llama3 starts 3043 425 413 2068
  set_tests_properties(cli_generate PROPERTIES PASS_REGULAR_EXPRESSION "generated ids: 3043 425 413 2068")
  add_test(NAME cli_convert_save_eval COMMAND ${CMAKE_COMMAND} -E env sh -c
    "rm -rf cli_mla && $<TARGET_FILE:cacheshrink_cli> convert --ratio 2 --calibration-samples 16 --out cli_mla && $<TARGET_FILE:cacheshrink_cli> eval --model cli_mla --windows 2")
  set_tests_properties(cli_convert_save_eval PROPERTIES PASS_REGULAR_EXPRESSION "perplexity: [0-9]+\\.[0-9]+")
  add_test(NAME cli_demo COMMAND cacheshrink_cli demo --windows 2)
  set_tests_properties(cli_demo PROPERTIES PASS_REGULAR_EXPRESSION "MLA greedy generation")
  add_test(NAME cli_bad_model COMMAND cacheshrink_cli info --model /nonexistent/model)
  set_tests_properties(cli_bad_model PROPERTIES PASS_REGULAR_EXPRESSION "error: /nonexistent/model: model directory does not exist")
  add_test(NAME cli_bad_option COMMAND cacheshrink_cli convert --method joint --group-size 2)
  set_tests_properties(cli_bad_option PROPERTIES PASS_REGULAR_EXPRESSION "xkv method only")
endif()
include(${CMAKE_CURRENT_SOURCE_DIR}/ExampleTests.cmake)
