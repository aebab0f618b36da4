# The example programs (examples/*.cpp) and the README's C++ quick start, built and run briefly.
# Included from tests/CMakeTests.cmake.

# ---- examples: each run on the embedded tiny models for a few seconds; each also checks
# something that can fail (exit code) and prints a line the test matches. ----
if(TARGET example_convert_model)
  add_test(NAME example_convert_model
    COMMAND example_convert_model ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 ${CMAKE_CURRENT_BINARY_DIR}/example_convert_model_out 2)
  set_tests_properties(example_convert_model PROPERTIES PASS_REGULAR_EXPRESSION "logits are bit-identical")

  add_test(NAME example_evaluate_cache_memory COMMAND example_evaluate_cache_memory ${CACHESHRINK_FIXTURES_DIR}/models/tiny-gpt2 4 4)
  set_tests_properties(example_evaluate_cache_memory PROPERTIES PASS_REGULAR_EXPRESSION "prediction matches the runtime cache")

  add_test(NAME example_generate_text COMMAND example_generate_text ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 "The history of" 12)
  set_tests_properties(example_generate_text PROPERTIES PASS_REGULAR_EXPRESSION "latent cache equals full recomputation")

  add_test(NAME example_sweep_policies COMMAND example_sweep_policies ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 2)
  set_tests_properties(example_sweep_policies PROPERTIES PASS_REGULAR_EXPRESSION "compile-time cache formulas match")

  add_test(NAME example_attention_microbench COMMAND example_attention_microbench ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 2 4)
  set_tests_properties(example_attention_microbench PROPERTIES PASS_REGULAR_EXPRESSION "MLA/standard")

  # Fine-tuning with each loss, 6 optimizer steps: reconstruction on tiny-llama3 (auto: xkv 2x), distillation
  # on tiny-gpt2 (auto: separate 2x); the loss plots go into the build dir.
  add_test(NAME example_finetune_recon
    COMMAND example_finetune ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 recon 6 ${CMAKE_CURRENT_BINARY_DIR}/example_finetune_recon.svg)
  add_test(NAME example_finetune_distill
    COMMAND example_finetune ${CACHESHRINK_FIXTURES_DIR}/models/tiny-gpt2 distill 6 ${CMAKE_CURRENT_BINARY_DIR}/example_finetune_distill.svg)
  set_tests_properties(example_finetune_recon PROPERTIES PASS_REGULAR_EXPRESSION "recon loss: 6 steps.*fine-tuning checks passed")
  set_tests_properties(example_finetune_distill PROPERTIES PASS_REGULAR_EXPRESSION "distill loss: 6 steps.*fine-tuning checks passed")

  # A failing exit code must fail these tests even when the expected line was printed.
  foreach(t example_convert_model example_evaluate_cache_memory example_generate_text example_sweep_policies example_attention_microbench
            example_finetune_recon example_finetune_distill)
    set_tests_properties(${t} PROPERTIES LABELS "examples" TIMEOUT 300 FAIL_REGULAR_EXPRESSION "error:|DIFFER|MISMATCH|DOES NOT MATCH|FAILED")
  endforeach()
endif()

# ---- the CLI's energy plot ----
if(TARGET cacheshrink_cli)
  add_test(NAME cli_convert_plot_energy COMMAND ${CMAKE_COMMAND} -E env sh -c
    "rm -f cli_energy.svg && $<TARGET_FILE:cacheshrink_cli> convert --ratio 2 --calibration-samples 8 --plot-energy cli_energy.svg && grep -c '<path ' cli_energy.svg")
  # tiny-llama3: 4 layers x (K, V) = 8 curves
  set_tests_properties(cli_convert_plot_energy PROPERTIES PASS_REGULAR_EXPRESSION "energy plot: cli_energy.svg.*\n8\n")

  # train --plot-loss --json (4 steps), then plot-loss on the stats it wrote: total, LM, recon, mean
  # of the last 2 (loss panel) + 2 learning rates + gradient norm = 7 curves.
  add_test(NAME cli_train_plot_loss COMMAND ${CMAKE_COMMAND} -E env sh -c
    "rm -rf cli_ft cli_loss.svg cli_loss2.svg && $<TARGET_FILE:cacheshrink_cli> train --model ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 --ratio 2 --calibration-samples 8 --data ${CACHESHRINK_FIXTURES_DIR}/data/wikitext2_valid.txt --paragraphs 16 --epochs 1 --max-length 64 --warmup-steps 1 --recon-alpha 0.3 --out cli_ft --plot-loss cli_loss.svg --plot-smooth 2 --json --quiet && grep -c '<path ' cli_loss.svg && $<TARGET_FILE:cacheshrink_cli> plot-loss cli_ft/train_stats.json --out cli_loss2.svg && grep -c '<path ' cli_loss2.svg")
  set_tests_properties(cli_train_plot_loss PROPERTIES
    PASS_REGULAR_EXPRESSION "\"loss_plot\": \"cli_loss.svg\".*\"steps\": 4.*\n7\nloss plot: cli_loss2.svg \\(4 steps, loss [0-9.]+ -> [0-9.]+\\)\n6\n"
    FAIL_REGULAR_EXPRESSION "error:|warning:")
  # train --device cuda: trains on a GPU (4 steps, as above) or, without one or without the CUDA
  # backend, stops before any conversion work with an error naming the option.
  add_test(NAME cli_train_device_cuda COMMAND ${CMAKE_COMMAND} -E env sh -c
    "rm -rf cli_ft_gpu && $<TARGET_FILE:cacheshrink_cli> train --model ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3 --ratio 2 --calibration-samples 8 --data ${CACHESHRINK_FIXTURES_DIR}/data/wikitext2_valid.txt --paragraphs 16 --epochs 1 --max-length 64 --warmup-steps 1 --recon-alpha 0.3 --out cli_ft_gpu --device cuda --json --quiet 2>&1")
  set_tests_properties(cli_train_device_cuda PROPERTIES
    PASS_REGULAR_EXPRESSION "^error: --device cuda: (no CUDA device is visible|this cacheshrink was built without the CUDA backend)|\"steps\": 4")
  # eval / convert / generate --device cuda against the CPU (tests/cli_device_cuda.sh): perplexities
  # within 1e-5 (eval, float32), 1e-3 (eval, bf16) and 1e-4 (the converted model, float32
  # calibration), the same greedy tokens; without a GPU or a CUDA build, the error naming --device cuda.
  add_test(NAME cli_eval_convert_device_cuda COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/cli_device_cuda.sh $<TARGET_FILE:cacheshrink_cli>
    ${CACHESHRINK_FIXTURES_DIR})
  set_tests_properties(cli_eval_convert_device_cuda PROPERTIES
    PASS_REGULAR_EXPRESSION "^error: --device cuda: (no CUDA device is visible|this cacheshrink was built without the CUDA backend)|eval f32: .* ok\neval bf16: .* ok\nconvert f32: .* ok\ngenerate f32: gpu = cpu ok\n"
    FAIL_REGULAR_EXPRESSION "MISMATCH|no perplexity")
  add_test(NAME cli_eval_bf16_needs_cuda COMMAND $<TARGET_FILE:cacheshrink_cli> eval --precision bf16 --windows 1)
  set_tests_properties(cli_eval_bf16_needs_cuda PROPERTIES PASS_REGULAR_EXPRESSION "error: eval: --precision bf16 applies to --device cuda")
  add_test(NAME cli_train_tf32_needs_cuda COMMAND $<TARGET_FILE:cacheshrink_cli> train --model ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3
    --data ${CACHESHRINK_FIXTURES_DIR}/data/wikitext2_valid.txt --out never --tf32)
  set_tests_properties(cli_train_tf32_needs_cuda PROPERTIES PASS_REGULAR_EXPRESSION "error: --tf32 applies to --device cuda")
  # plot-loss refuses a JSON file that is not training stats, naming it.
  add_test(NAME cli_plot_loss_bad_input COMMAND $<TARGET_FILE:cacheshrink_cli> plot-loss ${CACHESHRINK_FIXTURES_DIR}/models/tiny-llama3/config.json --out never.svg)
  set_tests_properties(cli_plot_loss_bad_input PROPERTIES PASS_REGULAR_EXPRESSION "error: .*config.json: expected a JSON object with a \"steps\" array")
endif()

# ---- README: every ```cpp block compiles as written and runs (from the source dir, so its
# relative tests/fixtures paths resolve; TMPDIR points into the build dir so its
# temp_directory_path() output stays out of /tmp). Extracted at configure time; README.md is a
# configure dependency, so editing it re-extracts on the next build. ----
set(MARKDOWN ${PROJECT_SOURCE_DIR}/README.md)
set(OUT_DIR ${CMAKE_CURRENT_BINARY_DIR}/readme_snippet)
set(PREFIX readme_snippet)
file(MAKE_DIRECTORY ${OUT_DIR})
include(${CMAKE_CURRENT_LIST_DIR}/readme_snippet/extract_cpp_blocks.cmake)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${MARKDOWN})
set(_i 0)
foreach(src IN LISTS CPP_BLOCK_FILES)
  add_executable(readme_snippet_${_i} ${src})
  target_link_libraries(readme_snippet_${_i} PRIVATE cacheshrink::cacheshrink cacheshrink_project_flags)
  file(MAKE_DIRECTORY ${OUT_DIR}/tmp_${_i})
  add_test(NAME readme_snippet_${_i} COMMAND readme_snippet_${_i} WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(readme_snippet_${_i} PROPERTIES LABELS "readme" TIMEOUT 300 ENVIRONMENT "TMPDIR=${OUT_DIR}/tmp_${_i}")
  math(EXPR _i "${_i} + 1")
endforeach()

# ---- docs/reference.md's CLI section equals the program's --help output ----
if(TARGET cacheshrink_cli)
  add_test(NAME cli_reference_up_to_date COMMAND ${CMAKE_COMMAND} -DCLI=$<TARGET_FILE:cacheshrink_cli>
    -DDOC=${PROJECT_SOURCE_DIR}/docs/reference.md -DSOURCE_DIR=${PROJECT_SOURCE_DIR} -DMODE=check
    -P ${CMAKE_CURRENT_SOURCE_DIR}/readme_snippet/cli_reference.cmake)
  set_tests_properties(cli_reference_up_to_date PROPERTIES LABELS "docs")
endif()
