# Keeps the CLI section of docs/reference.md equal to the program's --help output.
#   cmake -DCLI=path/to/cacheshrink -DDOC=docs/reference.md -DSOURCE_DIR=<repo> -DMODE=write|check -P cli_reference.cmake
# The section lies between "<!-- BEGIN CLI HELP (generated) -->" and "<!-- END CLI HELP -->".
# Subcommands are read from the top-level help; SOURCE_DIR is replaced by <source> and the
# program path by "cacheshrink" so the text does not depend on the build machine.
foreach(v CLI DOC SOURCE_DIR MODE)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "cli_reference.cmake: -D${v}=... is required")
  endif()
endforeach()

function(help_of out)
  execute_process(COMMAND ${CLI} ${ARGN} --help OUTPUT_VARIABLE txt RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${CLI} ${ARGN} --help exited with ${rc}")
  endif()
  string(REPLACE "${CLI}" "cacheshrink" txt "${txt}")
  string(REPLACE "${SOURCE_DIR}" "<source>" txt "${txt}")
  set(${out} "${txt}" PARENT_SCOPE)
endfunction()

help_of(top)
# Subcommand names: the indented first words after "Subcommands:".
string(FIND "${top}" "Subcommands:" p)
string(SUBSTRING "${top}" ${p} -1 subs)
string(REGEX MATCHALL "\n  [a-z][a-z0-9_-]*" names "${subs}")
set(section "### cacheshrink --help\n\n```text\n${top}```\n")
foreach(n IN LISTS names)
  string(STRIP "${n}" n)
  help_of(h ${n})
  string(APPEND section "\n### cacheshrink ${n} --help\n\n```text\n${h}```\n")
endforeach()

file(READ "${DOC}" doc)
set(begin_marker "<!-- BEGIN CLI HELP (generated) -->\n")
set(end_marker "<!-- END CLI HELP -->")
string(FIND "${doc}" "${begin_marker}" b)
string(FIND "${doc}" "${end_marker}" e)
if(b EQUAL -1 OR e EQUAL -1 OR e LESS b)
  message(FATAL_ERROR "${DOC}: CLI help markers not found")
endif()
string(LENGTH "${begin_marker}" bl)
math(EXPR cs "${b} + ${bl}")
math(EXPR cl "${e} - ${cs}")
string(SUBSTRING "${doc}" ${cs} ${cl} current)
if(MODE STREQUAL "write")
  string(SUBSTRING "${doc}" 0 ${cs} head)
  string(SUBSTRING "${doc}" ${e} -1 tail)
  file(WRITE "${DOC}" "${head}${section}${tail}")
  message(STATUS "wrote the CLI help section of ${DOC}")
  return()
endif()
# CLI11 wraps a description onto its own line when the option column overflows, which depends
# on the length of the default paths: compare modulo whitespace.
string(REGEX REPLACE "[ \t\n]+" " " current_ws "${current}")
string(REGEX REPLACE "[ \t\n]+" " " section_ws "${section}")
if(NOT current_ws STREQUAL section_ws)
  message(FATAL_ERROR "${DOC}: the CLI help section differs from the program's --help output; regenerate it with\n"
    "  cmake -DCLI=build/examples/cacheshrink -DDOC=docs/reference.md -DSOURCE_DIR=$PWD -DMODE=write -P tests/readme_snippet/cli_reference.cmake")
endif()
message(STATUS "CLI help section of ${DOC} is up to date")
