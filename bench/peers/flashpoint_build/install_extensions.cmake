# Injected into ml-flashpoint 0.0.10's build as CMAKE_PROJECT_ml_flashpoint_cpp_INCLUDE.
# Why: its CMakeLists.txt writes its two extension modules into the source tree
# (CMAKE_LIBRARY_OUTPUT_DIRECTORY) and has no install() rule, so a wheel built from its
# sdist (pip's temporary copy) has no buffer_object_ext nor transfer_service_ext, and
# `import ml_flashpoint...buffer_object_ext` fails. These rules put them into the wheel,
# once every subdirectory has defined its targets (hence the deferred call).
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL _shardguard_bench_install_extensions)
function(_shardguard_bench_install_extensions)
  install(TARGETS buffer_object_ext LIBRARY DESTINATION ml_flashpoint/checkpoint_object_manager/buffer_object)
  install(TARGETS transfer_service_ext LIBRARY DESTINATION ml_flashpoint/replication/transfer_service)
endfunction()
