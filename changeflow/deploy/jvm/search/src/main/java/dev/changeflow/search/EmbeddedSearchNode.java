package dev.changeflow.search;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Collection;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;

import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.logging.LogConfigurator;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.index.mapper.MapperExtrasPlugin;
import org.opensearch.index.reindex.ReindexPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * A single OpenSearch node in a plain JVM, for the native local stack (no Docker, no tarball).
 *
 * <p>OpenSearch's own launcher loads its modules (the REST layer among them) from a distribution's
 * modules/ directory; from Maven Central we only have jars. {@link Node}'s protected constructor takes
 * the plugin classes directly, so this subclass passes the modules we need as classpath plugins.
 * Bootstrap checks (and the security manager) are part of the launcher and do not run here, which is
 * what we want for a loopback-only development node.
 *
 * <p>Usage: {@code java -cp classes:lib/* dev.changeflow.search.EmbeddedSearchNode <config dir>}; the
 * config dir holds opensearch.yml and log4j2.properties (written by changeflow/deploy/search_engine.py).
 */
public final class EmbeddedSearchNode extends Node {

    /** The modules a distribution would load from modules/: REST, analyzers, by-query APIs, field types. */
    static final List<Class<? extends Plugin>> PLUGINS = List.of(
        Netty4Plugin.class,
        CommonAnalysisPlugin.class,
        ReindexPlugin.class,
        MapperExtrasPlugin.class
    );

    EmbeddedSearchNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
        super(environment, plugins, true);
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: EmbeddedSearchNode <config dir containing opensearch.yml>");
            System.exit(2);
        }
        Path configDir = Paths.get(args[0]).toAbsolutePath();
        Settings fileSettings = Settings.builder().loadFromPath(configDir.resolve("opensearch.yml")).build();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            fileSettings, Collections.emptyMap(), configDir, () -> "changeflow-search");
        Files.createDirectories(environment.logsFile());
        LogConfigurator.registerErrorListener();
        LogConfigurator.configure(environment);

        EmbeddedSearchNode node = new EmbeddedSearchNode(environment, PLUGINS);
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "changeflow-search-shutdown"));
        node.start();
        System.out.println("changeflow: search node started on " + environment.settings().get("http.port"));
        stopped.await();
    }
}
